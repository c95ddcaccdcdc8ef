// Checkpoints: one safetensors file holding the weights under their PyTorch-style names,
// the AdamW moments ("optimizer.m.<name>", "optimizer.v.<name>"), and in __metadata__ the
// resolved config, the vocabulary, the step and every generator state needed for an exact
// resume. Written atomically (temporary file, fsync, rename).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moe/data/tokenizer.hpp"
#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/tensor/rng.hpp"

namespace moe {

constexpr const char* kCheckpointFormat = "moe-checkpoint-v1";

struct TrainState {
  int64_t step = 0;  // the next step to run
  double best_val_loss = 1e30;
  RngState data_rng, dropout_rng, noise_rng;
  // Weights in the running average (training.average_start) so far; 0: none yet. When it is
  // not 0, a checkpoint's weights are the average and "optimizer.w.<name>" those training
  // continues from.
  int64_t average_count = 0;
};

// What a checkpoint holds besides the weights and moments.
struct CheckpointHeader {
  Config config;
  std::vector<uint32_t> vocab;  // code points, id = index
  TrainState state;
  bool has_optimizer = false;
};

// `trained`: with state.average_count > 0, the weights training continues from (the model
// holds the average), saved as "optimizer.w.<name>".
void save_checkpoint(const std::string& path, const Model& model, const AdamW* optimizer,
                     const std::vector<uint32_t>& vocab, const TrainState& state, const float* trained = nullptr);

// Reads the header (config, vocab, state) without the tensors (nor their checksum).
CheckpointHeader read_checkpoint_header(const std::string& path);
// The same from a loaded file's metadata; `path` names the source in every error.
CheckpointHeader checkpoint_header_from_metadata(const std::map<std::string, std::string>& meta,
                                                 const std::string& path);

// Loads weights (and moments when optimizer is non-null) into a model built from the
// header's config. Throws naming the path and the tensor on any mismatch. From a path (or a
// file of which only the header was read), it reads the file once, keeping only what it loads
// (the checksum still covers every byte). `average` (with the optimizer, for --resume): where
// the weights go when the file holds an average ("average.count" > 0); the model then gets
// the weights training continues from.
void load_checkpoint_tensors(const std::string& path, Model& model, AdamW* optimizer, float* average = nullptr);
void load_checkpoint_tensors(const SafeTensorsFile& file, Model& model, AdamW* optimizer, bool check = true,
                             float* average = nullptr);

// A model and its tokenizer, loaded from a checkpoint (weights only) for inference: the file is
// read once, the AdamW moments (two thirds of it) only through the checksum.
struct InferenceModel {
  CheckpointHeader header;
  Tokenizer tokenizer;
  std::unique_ptr<Model> model;
  // Loaded with defer_checksum: checks the file's checksum, throwing as loading would have
  // (a pass over the whole file, about 0.1 s for makemoe.json's 108 MB: moe generate runs it
  // on a thread of its own while the first characters are computed). Else empty.
  std::function<void()> check_checksum;
};
InferenceModel load_for_inference(const std::string& path, bool defer_checksum = false);

// Throws, listing the differing fields, unless `now` may continue a run saved with `saved`
// (only the run directory, step budget, thread count and reporting intervals may change).
void check_resume_compatible(const Config& saved, const Config& now, const std::string& path);

}  // namespace moe
