// The random-generator streams, one per purpose, so that drawing from one never shifts
// another. Checkpoints save (seed, stream, counter) per generator: do not renumber.
#pragma once

#include <cstdint>

namespace moe {

enum RngStream : uint64_t {
  kStreamInit = 1,        // parameter initialisation
  kStreamData = 2,        // training batches
  kStreamDropout = 3,     // dropout masks
  kStreamNoise = 4,       // router noise in training
  kStreamEvalData = 5,    // the trainer's loss-estimate batches (the same at every estimate)
  kStreamEvalNoise = 6,   // router noise at evaluation (router.noise_at_eval)
  kStreamSample = 11,     // sampling the next character in generation
  kStreamSampleNoise = 12,  // router noise in generation (router.noise_at_eval)
  kStreamUpcycle = 13,      // moe upcycle: the noise on the experts' copies
};

}  // namespace moe
