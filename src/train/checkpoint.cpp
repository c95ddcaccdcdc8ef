#include "moe/train/checkpoint.hpp"
#include "moe/io/json_excerpt.hpp"

#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "moe/io/safetensors.hpp"

namespace moe {

namespace {

nlohmann::json rng_to_json(const RngState& s) { return {s.seed, s.stream, s.counter}; }

// A malformed metadata value; the caller adds the path.
struct MetaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An unsigned JSON integer at most `max`. nlohmann's get<uint64_t>() also takes floats, with a
// cast that is undefined behaviour when out of range (1e300), and wraps negative integers.
uint64_t json_uint(const nlohmann::json& j, uint64_t max, const std::string& what) {
  if (!j.is_number_unsigned() || j.get<uint64_t>() > max)
    throw MetaError(what + " must be an integer in [0, " + std::to_string(max) + "], got " + json_excerpt(j));
  return j.get<uint64_t>();
}

RngState rng_from_json(const nlohmann::json& j) {
  return {json_uint(j.at(0), UINT64_MAX, "generator seed"), json_uint(j.at(1), UINT64_MAX, "generator stream"),
          json_uint(j.at(2), UINT64_MAX, "generator counter")};
}

std::string meta_at(const std::map<std::string, std::string>& meta, const std::string& key,
                    const std::string& path) {
  auto it = meta.find(key);
  if (it == meta.end())
    throw std::runtime_error("checkpoint " + path + ": metadata has no '" + key +
                             "' (not a moe checkpoint, or from an incompatible version)");
  return it->second;
}

}  // namespace

void save_checkpoint(const std::string& path, const Model& model, const AdamW* optimizer,
                     const std::vector<uint32_t>& vocab, const TrainState& state, const float* trained) {
  const ParamStore& ps = model.params();
  std::vector<TensorEntry> entries;
  auto add_block = [&](const std::string& prefix, const float* base) {
    for (const ParamInfo& p : ps.infos()) {
      TensorEntry e;
      e.name = prefix + p.name;
      e.dtype = DType::F32;
      e.shape.assign(p.shape.dims.begin(), p.shape.dims.begin() + p.shape.ndim);
      e.data = base + p.offset;
      e.nbytes = sizeof(float) * size_t(p.shape.numel());
      entries.push_back(e);
    }
  };
  add_block("", ps.data());
  for (const Model::Buffer& b : model.buffers())
    entries.push_back({b.name, DType::F32, {b.size}, model.buffer_data() + b.offset, sizeof(float) * size_t(b.size)});
  if (optimizer) {
    add_block("optimizer.m.", optimizer->m().data());
    add_block("optimizer.v.", optimizer->v().data());
  }
  if (state.average_count > 0) {
    if (!trained) throw std::logic_error("save_checkpoint: an average without the weights training continues from");
    add_block("optimizer.w.", trained);
  }
  std::map<std::string, std::string> meta;
  meta["format"] = kCheckpointFormat;
  meta["config"] = config_to_json(model.config()).dump();
  meta["vocab"] = nlohmann::json(vocab).dump();
  meta["step"] = std::to_string(state.step);
  meta["best_val_loss"] = nlohmann::json(state.best_val_loss).dump();
  meta["rng"] = nlohmann::json{{"data", rng_to_json(state.data_rng)},
                               {"dropout", rng_to_json(state.dropout_rng)},
                               {"noise", rng_to_json(state.noise_rng)}}
                    .dump();
  if (optimizer) meta["optimizer.steps"] = std::to_string(optimizer->steps());
  if (state.average_count > 0) meta["average.count"] = std::to_string(state.average_count);
  save_safetensors(path, entries, meta);
}

CheckpointHeader read_checkpoint_header(const std::string& path) {
  return checkpoint_header_from_metadata(read_safetensors_header(path).metadata(), path);
}

CheckpointHeader checkpoint_header_from_metadata(const std::map<std::string, std::string>& meta,
                                                 const std::string& path) {
  const std::string format = meta_at(meta, "format", path);
  if (format != kCheckpointFormat)
    throw std::runtime_error("checkpoint " + path + " has format '" + format + "'; this moe reads '" +
                             kCheckpointFormat + "'");
  CheckpointHeader h;
  try {
    h.config = config_from_json(nlohmann::json::parse(meta_at(meta, "config", path)), path + " (metadata)");
    const nlohmann::json vocab = nlohmann::json::parse(meta_at(meta, "vocab", path));
    if (!vocab.is_array()) throw MetaError("vocab must be an array of code points, got " + json_excerpt(vocab));
    for (const auto& cp : vocab) h.vocab.push_back(uint32_t(json_uint(cp, UINT32_MAX, "vocab entry")));
    h.state.step = std::stoll(meta_at(meta, "step", path));
    h.state.best_val_loss = nlohmann::json::parse(meta_at(meta, "best_val_loss", path)).get<double>();
    const nlohmann::json rng = nlohmann::json::parse(meta_at(meta, "rng", path));
    h.state.data_rng = rng_from_json(rng.at("data"));
    h.state.dropout_rng = rng_from_json(rng.at("dropout"));
    h.state.noise_rng = rng_from_json(rng.at("noise"));
    if (meta.count("average.count"))
      h.state.average_count = int64_t(json_uint(nlohmann::json::parse(meta.at("average.count")), INT64_MAX, "average.count"));
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("checkpoint " + path + ": malformed metadata (" + e.what() + ")");
  } catch (const MetaError& e) {
    throw std::runtime_error("checkpoint " + path + ": malformed metadata (" + e.what() + ")");
  }
  h.has_optimizer = meta.count("optimizer.steps") > 0;
  return h;
}

void load_checkpoint_tensors(const std::string& path, Model& model, AdamW* optimizer, float* average) {
  load_checkpoint_tensors(read_safetensors_header(path), model, optimizer, true, average);
}

void load_checkpoint_tensors(const SafeTensorsFile& f, Model& model, AdamW* optimizer, bool check, float* average) {
  const std::string& path = f.path();
  ParamStore& ps = model.params();
  std::vector<SafeTensorsFile::F32Dest> wanted;
  auto load_block = [&](const std::string& prefix, float* base) {
    for (const ParamInfo& p : ps.infos()) wanted.push_back({prefix + p.name, p.shape, base + p.offset});
  };
  const bool averaged = optimizer && average && f.metadata().count("average.count") > 0;
  load_block("", averaged ? average : ps.data());
  if (averaged) load_block("optimizer.w.", ps.data());
  for (const Model::Buffer& b : model.buffers()) wanted.push_back({b.name, Shape{b.size}, model.buffer_data() + b.offset});
  if (optimizer) {
    const auto& meta = f.metadata();
    optimizer->set_steps(std::stoll(meta_at(meta, "optimizer.steps", path)));
    load_block("optimizer.m.", optimizer->m().data());
    load_block("optimizer.v.", optimizer->v().data());
  }
  f.read_f32(wanted, check);  // without the optimizer, the moments stay on disk
}

void check_resume_compatible(const Config& saved, const Config& now, const std::string& path) {
  nlohmann::json a = config_to_json(saved), b = config_to_json(now);
  // What may change on resume: where the run logs, how long it runs, how often it reports,
  // the batch per process (to keep the global batch when the number of processes changes),
  // and how (threads, recomputation), which does not change the numbers.
  for (auto* j : {&a, &b}) {
    (*j)["logging"].erase("out_dir");
    (*j)["training"].erase("max_steps");
    (*j)["training"].erase("batch_size");
    (*j)["training"].erase("threads");
    (*j)["training"].erase("recompute");
    (*j)["training"].erase("keep_activations");
    (*j)["logging"].erase("log_interval");
    (*j)["logging"].erase("eval_interval");
    (*j)["logging"].erase("eval_iters");
    (*j)["logging"].erase("checkpoint_interval");
  }
  if (a == b) return;
  std::string diffs;
  for (auto& [section, fields] : a.items())
    for (auto& [key, value] : fields.items())
      if (!b.contains(section) || !b[section].contains(key) || b[section][key] != value)
        diffs += "\n  " + section + "." + key + ": checkpoint " + value.dump() + ", config " +
                 (b.contains(section) && b[section].contains(key) ? b[section][key].dump() : "absent");
  throw std::runtime_error("--resume " + path + " was trained with a different config:" + diffs +
                           "\nresume with the checkpoint's config, or start a new run");
}

InferenceModel load_for_inference(const std::string& path, bool defer_checksum) {
  InferenceModel l;
  auto f = std::make_shared<const SafeTensorsFile>(read_safetensors_header(path));  // the weights are read into the model
  l.header = checkpoint_header_from_metadata(f->metadata(), path);
  l.tokenizer = Tokenizer::from_vocab(l.header.vocab);
  l.model = std::make_unique<Model>(l.header.config, int64_t(l.header.vocab.size()));
  load_checkpoint_tensors(*f, *l.model, nullptr, !defer_checksum);
  if (defer_checksum) l.check_checksum = [f] { f->verify_checksum(); };
  return l;
}

}  // namespace moe
