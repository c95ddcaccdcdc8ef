// Sparse upcycling (Komatsuzaki et al. 2022): an MoE model whose every expert starts as a copy
// of a dense model's feed-forward network, with the dense model's attention, embeddings and
// norms, and a fresh router.
#pragma once

#include <cstdint>
#include <string>

#include "moe/io/config.hpp"

namespace moe {

struct UpcycleOptions {
  double noise = 0;   // std of the Gaussian noise added to every expert copy (0: exact copies)
  int64_t seed = 0;   // of that noise (stream kStreamUpcycle)
};

// The source tensor of an MoE model's parameter `name` in the dense source: an expert's
// ("blocks.{i}.moe.experts.{e}.{rest}") comes from the source's one FFN, "blocks.{i}.{ffn}{rest}"
// (ffn "moe.experts.0." for a one-expert model, "ffn." for a dense-FFN block); the router's
// ("*.moe.router.*") from nowhere (""): fresh; everything else from the same name.
std::string upcycle_source_name(const std::string& name, const std::string& ffn = "moe.experts.0.");

// Reads the dense checkpoint `from` (router.num_experts 1), builds the MoE model of `cfg`,
// initialised as `moe train` would (training.seed), copies the dense weights in, and writes a
// checkpoint without optimizer state to `out`. Throws naming the field or tensor that does not fit.
void upcycle(const std::string& from, const Config& cfg, const std::string& out, const UpcycleOptions& opt);

}  // namespace moe
