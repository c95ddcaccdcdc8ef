#include "moe/train/upcycle.hpp"

#include <regex>
#include <stdexcept>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/tensor/streams.hpp"
#include "moe/train/checkpoint.hpp"

namespace moe {

namespace {

const std::regex kExpert(R"(blocks\.(\d+)\.moe\.experts\.\d+\.(.*))");
const std::regex kBlock(R"(blocks\.(\d+)\..*)");

}  // namespace

std::string upcycle_source_name(const std::string& name, const std::string& ffn) {
  if (name.find(".moe.router.") != std::string::npos) return "";
  std::smatch m;
  if (std::regex_match(name, m, kExpert)) return "blocks." + m[1].str() + "." + ffn + m[2].str();
  return name;
}

void upcycle(const std::string& from, const Config& cfg, const std::string& out, const UpcycleOptions& opt) {
  const SafeTensorsFile src = load_safetensors(from);
  const CheckpointHeader h = checkpoint_header_from_metadata(src.metadata(), from);
  const Config& d = h.config;
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error("moe upcycle: " + from + " does not fit the MoE config: " + what);
  };
  // Dense: every block's feed-forward is one FFN, "blocks.{l}.ffn." in a dense block
  // (model.dense_first, moe_every) or the one expert of an MoE block with router.num_experts 1.
  if (d.moe_blocks() > 0 && d.router.num_experts != 1)
    fail("the source must be dense (router.num_experts 1, or dense blocks only: model.dense_first = n_layer), it has "
         "router.num_experts " + std::to_string(d.router.num_experts) + " in " + std::to_string(d.moe_blocks()) +
         " MoE blocks");
  const auto same = [&](const char* field, const auto& a, const auto& b) {
    if (a != b) fail(std::string(field) + " is " + nlohmann::json(a).dump() + " in the source, " + nlohmann::json(b).dump() + " in the config");
  };
  same("model.n_embed", d.model.n_embed, cfg.model.n_embed);
  same("model.n_layer", d.model.n_layer, cfg.model.n_layer);
  same("model.n_head", d.model.n_head, cfg.model.n_head);
  same("model.block_size", d.model.block_size, cfg.model.block_size);
  if (d.moe_blocks() > 0)
    same("the expert hidden width (model.expert_hidden, 0: 4 * n_embed)", d.expert_hidden_size(), cfg.expert_hidden_size());
  if (d.moe_blocks() < d.model.n_layer)
    same("the dense blocks' width against the experts' (model.dense_hidden in the source, model.expert_hidden in the "
         "config; 0: 4 * n_embed)",
         d.dense_hidden_size(), cfg.expert_hidden_size());
  same("model.expert_ffn", std::string(name_of(d.model.expert_ffn)), std::string(name_of(cfg.model.expert_ffn)));
  same("model.shared_experts", d.model.shared_experts, cfg.model.shared_experts);
  if (cfg.router.num_experts < 2) fail("the config's router.num_experts must be at least 2 to upcycle into");

  Model model(cfg, int64_t(h.vocab.size()));
  Rng init(uint64_t(cfg.training.seed), kStreamInit);
  model.init(init);  // the router (and anything not copied) as `moe train` would start it
  Rng noise(uint64_t(opt.seed), kStreamUpcycle);
  ParamStore& ps = model.params();
  for (const ParamInfo& p : ps.infos()) {
    // Where the source's FFN of this block lives: its dense FFN, or its MoE block's one expert.
    std::smatch block;
    const bool dense_source = std::regex_match(p.name, block, kBlock) && !d.moe_block(std::stoll(block[1].str()));
    const std::string name = upcycle_source_name(p.name, dense_source ? "ffn." : "moe.experts.0.");
    if (name.empty()) continue;
    if (!src.has(name)) fail("it has no tensor " + name + " (for " + p.name + ")");
    const std::vector<int64_t>& shape = src.info(name).shape;
    const std::vector<int64_t> want(p.shape.dims.begin(), p.shape.dims.begin() + p.shape.ndim);
    if (shape != want)
      fail(name + " has shape " + nlohmann::json(shape).dump() + ", " + p.name + " needs " + p.shape.str() +
           (name == "tok_emb.weight" || name == "lm_head.weight" || name == "lm_head.bias" ? " (a different vocabulary?)" : ""));
    float* dst = ps.data() + p.offset;
    src.copy_f32(name, p.shape, dst);
    if (opt.noise > 0 && name != p.name) {  // an expert's copy
      std::vector<float> n(size_t(p.shape.numel()));
      noise.fill_normal(n.data(), int64_t(n.size()), 0.f, float(opt.noise));
      for (size_t i = 0; i < n.size(); ++i) dst[i] += n[i];
    }
  }
  save_checkpoint(out, model, nullptr, h.vocab, TrainState{});  // weights only: `moe train --init` starts from them
}

}  // namespace moe
