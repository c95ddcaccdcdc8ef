#include "moe/tensor/streams.hpp"
#include "moe/generate/generator.hpp"

#include <algorithm>
#include <stdexcept>

namespace moe {

Generator::Generator(Model& model, const GenerateOptions& opt)
    : model_(model), opt_(opt), rng_(opt.seed, kStreamSample) {
  validate(opt_.sampling);
  const int64_t T = model_.config().model.block_size;
  if (model_.config().model.position == PositionKind::kRope && opt_.context_keep > 0)
    throw std::invalid_argument("--context-keep does not apply to this model (model.position = \"rope\"): its key/value "
                                "cache rolls, each character seeing the last block_size " + std::to_string(T) +
                                " without encoding anything again");
  if (opt_.context_keep <= 0) opt_.context_keep = std::max<int64_t>(1, T / 2);
  if (opt_.context_keep > T)
    throw std::invalid_argument("--context-keep must be at most the model's block_size " + std::to_string(T) +
                                ", got " + std::to_string(opt_.context_keep));
}

void Generator::generate(const std::vector<int32_t>& prompt, int64_t max_new,
                         const std::function<void(int32_t)>& on_token) {
  const int64_t T = model_.config().model.block_size;
  const int64_t V = model_.vocab_size();
  const bool rolling = model_.config().model.position == PositionKind::kRope;
  std::vector<int32_t> ctx(prompt.end() - std::min<int64_t>(int64_t(prompt.size()), T), prompt.end());
  if (ctx.empty()) ctx.push_back(0);
  Rng noise_rng(opt_.seed, kStreamSampleNoise);  // only drawn when router.noise_at_eval
  ForwardOptions fo;
  fo.noise_rng = &noise_rng;
  fo.profile = opt_.profile;
  DecodeProfile* prof = opt_.profile;
  KVCache cache = model_.new_cache();
  std::vector<float> logits(static_cast<size_t>(V));
  std::vector<std::pair<float, int32_t>> scratch;
  auto feed = [&](const int32_t* ids, int64_t n) {
    const float* l = model_.decode(cache, ids, n, fo);
    std::copy(l, l + V, logits.begin());
  };
  feed(ctx.data(), int64_t(ctx.size()));
  for (int64_t i = 0; i < max_new; ++i) {
    const double t0 = prof ? DecodeProfile::now() : 0;
    const int32_t next = sample_token(logits.data(), V, opt_.sampling, rng_, scratch);
    const double t1 = prof ? DecodeProfile::now() : 0;
    on_token(next);
    if (prof) {
      const double t2 = DecodeProfile::now();
      prof->sampling += t1 - t0;
      prof->output += t2 - t1;
    }
    if (i + 1 == max_new) break;
    if (rolling) {  // the cache drops its oldest position itself
      feed(&next, 1);
      continue;
    }
    ctx.push_back(next);
    if (cache.len == T) {
      // Full: re-encode the last context_keep tokens from position 0.
      cache.len = 0;
      ctx.erase(ctx.begin(), ctx.end() - opt_.context_keep);
      feed(ctx.data(), int64_t(ctx.size()));
    } else {
      feed(&ctx.back(), 1);
    }
  }
}

}  // namespace moe
