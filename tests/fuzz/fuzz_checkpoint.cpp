// libFuzzer target: bytes as a safetensors file -> parse_safetensors (header length, JSON
// header, offsets, shapes, overlaps, checksum), every tensor read back, then the checkpoint
// header (config, vocabulary, step, generator states) and, for a small enough config, a
// model and optimizer loaded from the tensors -- what `moe generate/eval/train --resume`
// do with a checkpoint file. Errors must be std::exceptions.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "moe/data/tokenizer.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/train/checkpoint.hpp"

namespace {

// Rough parameter count, in double so absurd configs cannot overflow here.
double approx_params(const moe::Config& c, double vocab) {
  const double C = double(c.model.n_embed), F = c.model.expert_hidden > 0 ? double(c.model.expert_hidden) : 4 * C;
  const double E = double(c.router.num_experts), T = double(c.model.block_size);
  return (vocab + T) * C + double(c.model.n_layer) * (4 * C * C + 2 * C * E + E * 2 * C * F) + C * vocab;
}

void read_tensors(const moe::SafeTensorsFile& f) {
  for (const std::string& name : f.names()) {
    const moe::SafeTensorsFile::Info& i = f.info(name);
    const uint8_t* p = f.bytes(name);
    volatile uint8_t sink = 0;
    for (size_t k = i.begin; k < i.end; ++k) sink = sink ^ p[k - i.begin];
    if (i.dtype == moe::DType::F32 && i.shape.size() <= size_t(moe::kMaxDims)) {
      moe::Shape s;
      s.ndim = int(i.shape.size());
      for (size_t d = 0; d < i.shape.size(); ++d) s.dims[d] = i.shape[d];
      std::vector<float> out((i.end - i.begin) / 4 + 1);
      f.copy_f32(name, s, out.data());
    }
    if (i.dtype == moe::DType::I32) {
      std::vector<int32_t> out((i.end - i.begin) / 4 + 1);
      f.copy_i32(name, out.data(), int64_t((i.end - i.begin) / 4));
      try {
        f.copy_i32(name, out.data(), int64_t((i.end - i.begin) / 4) + 1);  // wrong count: must throw
        __builtin_trap();
      } catch (const std::exception&) {
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const moe::SafeTensorsFile f = moe::parse_safetensors(std::vector<uint8_t>(data, data + size), "fuzz.safetensors");
    read_tensors(f);
    const moe::CheckpointHeader h = moe::checkpoint_header_from_metadata(f.metadata(), f.path());
    const moe::Tokenizer tok = moe::Tokenizer::from_vocab(h.vocab);
    moe::check_resume_compatible(h.config, h.config, f.path());
    if (approx_params(h.config, double(tok.size())) > 2e5) return 0;  // keep each input fast and small
    moe::Model model(h.config, tok.size());
    std::unique_ptr<moe::AdamW> opt;
    if (h.has_optimizer) opt = std::make_unique<moe::AdamW>(h.config.optimizer, model.params());
    moe::load_checkpoint_tensors(f, model, opt.get());
  } catch (const std::exception&) {
  }
  return 0;
}
