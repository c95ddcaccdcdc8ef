// MoE options beyond makeMoE: balancing losses (gradient checks), gating variants, expert
// capacity, shared experts, SwiGLU/GELU experts, aux-loss-free balancing and router health.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "gradcheck.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/model/model.hpp"
#include "moe/ops/ops.hpp"

using namespace moe;
using test::Probe;
using test::random_vector;

namespace {

Config small_config() {
  nlohmann::json j = {{"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}, {"dropout", 0.0}}},
                      {"router", {{"num_experts", 4}, {"top_k", 2}, {"noisy", false}}}};
  return config_from_json(j, "small_config");
}

// A fixed batch of B x T token ids below V.
std::vector<int32_t> batch(int64_t n, int64_t V, uint64_t seed) {
  std::vector<float> r = random_vector(n, seed, 0.f, float(V));
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = std::min<int32_t>(int32_t(r[size_t(i)]), int32_t(V - 1));
  return ids;
}

}  // namespace

TEST_CASE("gradient checks: router losses and gating ops", "[moe][gradcheck]") {
  SECTION("switch_aux_loss (gradient through the mean probabilities)") {
    static const int32_t slots[4] = {5, 1, 0, 2};
    REQUIRE_GRADCHECK({random_vector(6 * 4, 1, -2, 2)}, {{6, 4}}, [](Graph& g, const std::vector<Tensor>& in) {
      return Probe{switch_aux_loss(g, in[0], slots), {}};
    });
  }
  SECTION("router_z_loss") {
    REQUIRE_GRADCHECK({random_vector(5 * 3, 2, -3, 3)}, {{5, 3}}, [](Graph& g, const std::vector<Tensor>& in) {
      return Probe{router_z_loss(g, in[0]), {}};
    });
  }
  SECTION("logsumexp") {
    REQUIRE_GRADCHECK({random_vector(4 * 5, 3, -2, 2)}, {{4, 5}}, [](Graph& g, const std::vector<Tensor>& in) {
      return Probe{logsumexp(g, in[0]), {}};
    });
  }
  SECTION("softmax over all experts, top-k, renormalised (Mixtral gating)") {
    REQUIRE_GRADCHECK({random_vector(6 * 5, 4, -2, 2)}, {{6, 5}}, [](Graph& g, const std::vector<Tensor>& in) {
      Tensor p = softmax(g, in[0]);
      int32_t* idx = topk_indices(g, p, 2);
      return Probe{normalize_rows(g, gather_cols(g, p, idx, 2)), std::vector<int32_t>(idx, idx + 12)};
    });
  }
  SECTION("top-k softmax with a selection bias: the bias picks, the logits weigh") {
    static const float bias[5] = {0.f, 3.f, 0.f, 0.f, -3.f};
    REQUIRE_GRADCHECK({random_vector(6 * 5, 5, -2, 2)}, {{6, 5}}, [](Graph& g, const std::vector<Tensor>& in) {
      TopK t = topk_softmax(g, in[0], 2, bias);
      return Probe{t.weights, std::vector<int32_t>(t.index, t.index + 12)};
    });
  }
}

// small_config with n_layer layers, the aux loss (0.5) and the z-loss (0.25), initialised.
static Model balanced_model(int64_t n_layer) {
  Config cfg = small_config();
  cfg.model.n_layer = n_layer;
  cfg.router.aux_loss_coef = 0.5;
  cfg.router.z_loss_coef = 0.25;
  Model m(cfg, 11);
  Rng init(1, 1);
  m.init(init);
  return m;
}

TEST_CASE("the aux and z losses enter the objective as coefficient x layer mean", "[moe]") {
  Model m = balanced_model(2);
  const auto x = batch(2 * 8, 11, 1), y = batch(2 * 8, 11, 2);
  Graph g;
  RoutingStats st;
  ForwardOptions fo;
  fo.stats = &st;
  Model::Output o = m.forward(g, x.data(), y.data(), 2, 8, fo);
  const nlohmann::json h = st.health();
  double aux = 0, z = 0;
  for (const auto& l : h) aux += l["aux_loss"].get<double>() / 2, z += l["z_loss"].get<double>() / 2;
  CHECK(aux > 0);
  CHECK(z > 0);
  CHECK(o.objective.data[0] - o.loss.data[0] == Approx(0.5 * aux + 0.25 * z).epsilon(1e-5));
}

TEST_CASE("a forward without gradients gives the same loss, objective and logits in one block's memory", "[moe]") {
  Model m = balanced_model(6);
  const auto x = batch(4 * 8, 11, 1), y = batch(4 * 8, 11, 2);
  Graph with_grad, no_grad;
  const Model::Output a = m.forward(with_grad, x.data(), y.data(), 4, 8, ForwardOptions{});
  NoGradGuard guard(no_grad);
  const Model::Output b = m.forward(no_grad, x.data(), y.data(), 4, 8, ForwardOptions{});
  CHECK(a.loss.data[0] == b.loss.data[0]);
  CHECK(a.objective.data[0] == b.objective.data[0]);
  CHECK(a.objective.data[0] != a.loss.data[0]);
  REQUIRE(a.logits.numel() == b.logits.numel());
  CHECK(std::equal(a.logits.data, a.logits.data + a.logits.numel(), b.logits.data));
  for (int64_t i = 0; i < 4 * 8; ++i) CHECK(b.token_losses[i] == a.token_losses[i]);
  // Six blocks' activations (and their gradients) against about one block's.
  CHECK(no_grad.arena().bytes_used() * 3 < with_grad.arena().bytes_used());
}

TEST_CASE("capacity drops exactly the lowest-probability overflow assignments", "[moe][capacity]") {
  // 6 tokens, K = 1, E = 2: expert 0 chosen by tokens 0..4, expert 1 by token 5.
  const int32_t index[6] = {0, 0, 0, 0, 0, 1};
  const float gates[6] = {0.3f, 0.9f, 0.5f, 0.9f, 0.1f, 0.7f};
  int32_t offsets[3], token[6], pos[6];
  group_by_expert(index, 6, 1, 2, offsets, token, pos);
  // capacity 3: expert 0 keeps its three largest gates (tokens 1, 3 and 2), in row order;
  // tokens 0 (0.3) and 4 (0.1) are dropped, not the last ones in batch order.
  CHECK(apply_capacity(offsets, token, pos, gates, 2, 3) == 2);
  CHECK(std::vector<int32_t>(offsets, offsets + 3) == std::vector<int32_t>{0, 3, 4});
  CHECK(std::vector<int32_t>(token, token + 4) == std::vector<int32_t>{1, 2, 3, 5});
  CHECK(std::vector<int32_t>(pos, pos + 4) == std::vector<int32_t>{1, 2, 3, 5});

  // Ties keep the earlier slot: gates all equal, capacity 2 keeps tokens 0 and 1.
  const float equal[6] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  group_by_expert(index, 6, 1, 2, offsets, token, pos);
  CHECK(apply_capacity(offsets, token, pos, equal, 2, 2) == 3);
  CHECK(std::vector<int32_t>(token, token + 3) == std::vector<int32_t>{0, 1, 5});
}

TEST_CASE("capacity applies in training, and at evaluation only when asked", "[moe][capacity]") {
  Config cfg = small_config();
  cfg.router.capacity_factor = 0.5;  // capacity = ceil(0.5 * 2 * 16 / 4) = 4 of the 8 slots on average
  Model m(cfg, 11);
  Rng init(1, 1);
  m.init(init);
  const auto x = batch(2 * 8, 11, 1), y = batch(2 * 8, 11, 2);
  auto dropped_frac = [&](bool training) {
    Graph g;
    RoutingStats st;
    ForwardOptions fo;
    fo.training = training;
    fo.stats = &st;
    m.forward(g, x.data(), y.data(), 2, 8, fo);
    return st.health()[0]["dropped_frac"].get<double>();
  };
  CHECK(dropped_frac(true) >= 0.5);  // at most 4 x 4 of 32 slots kept
  CHECK(dropped_frac(false) == 0);
  m = Model([&] {
    Config c = cfg;
    c.router.capacity_at_eval = true;
    return c;
  }(), 11);
  m.init(init);
  CHECK(dropped_frac(false) >= 0.5);
}

TEST_CASE("shared experts see every token", "[moe][shared]") {
  Config cfg = small_config();
  cfg.model.n_layer = 1;
  cfg.model.shared_experts = 1;
  cfg.model.expert_ffn = GENERATE(ExpertFfn::kRelu, ExpertFfn::kGelu, ExpertFfn::kSwiglu);
  INFO(name_of(cfg.model.expert_ffn));
  Model m(cfg, 11);
  Rng init(1, 1);
  m.init(init);
  const auto x = batch(2 * 8, 11, 3);
  auto logits = [&] {
    Graph g;
    Model::Output o = m.forward(g, x.data(), nullptr, 2, 8, {});
    return std::vector<float>(o.logits.data, o.logits.data + o.logits.numel());
  };
  const std::vector<float> with = logits();
  // Zero the shared expert's output layer: every token's logits must change.
  for (const ParamInfo& p : m.params().infos())
    if (p.name.find("moe.shared.0.fc2") != std::string::npos)
      std::fill(m.params().data() + p.offset, m.params().data() + p.offset + p.shape.numel(), 0.f);
  const std::vector<float> without = logits();
  for (int64_t t = 0; t < 16; ++t) {
    double diff = 0;
    for (int64_t v = 0; v < 11; ++v) diff += std::fabs(with[size_t(t * 11 + v)] - without[size_t(t * 11 + v)]);
    INFO("token " << t);
    CHECK(diff > 1e-4);
  }
  // Its parameters count as active for every token.
  int64_t shared = 0;
  for (const ParamInfo& p : m.params().infos())
    if (p.name.find("moe.shared.") != std::string::npos) shared += p.shape.numel();
  CHECK(shared == (cfg.model.expert_ffn == ExpertFfn::kSwiglu ? 3 * 16 * 64 : 2 * 16 * 64 + 64 + 16));
  int64_t routed = 0;
  for (const ParamInfo& p : m.params().infos())
    if (p.name.find("moe.experts.") != std::string::npos) routed += p.shape.numel();
  CHECK(m.active_param_count() == m.params().parameter_count() - routed / 2);  // k = 2 of 4 experts
}

TEST_CASE("aux-loss-free bias moves load toward balance on a skewed router", "[moe][balance]") {
  Config cfg = small_config();
  cfg.router.bias_update_rate = 0.05;
  Model m(cfg, 11);
  Rng init(1, 1);
  m.init(init);
  // Skew every layer's router: expert 0 gets +2 on its logit.
  for (const ParamInfo& p : m.params().infos())
    if (p.name.find("router.route.bias") != std::string::npos) m.params().data()[p.offset] += 2.f;
  const auto x = batch(4 * 8, 11, 5), y = batch(4 * 8, 11, 6);
  auto violation = [&] {
    Graph g;
    RoutingStats st;
    ForwardOptions fo;
    fo.training = true;  // records the load the update reads
    fo.stats = &st;
    m.forward(g, x.data(), y.data(), 4, 8, fo);
    double worst = 0;
    for (const auto& l : st.health()) worst = std::max(worst, l["max_violation"].get<double>());
    return worst;
  };
  const double before = violation();
  for (int i = 0; i < 60; ++i) {
    violation();
    m.update_balance_bias();
  }
  const double after = violation();
  INFO("max violation before " << before << ", after " << after);
  CHECK(before > 0.5);
  CHECK(after < before / 2);
  // The overloaded expert's bias went down, and the biases are saved as buffers.
  REQUIRE(m.buffers().size() == 2);
  CHECK(m.buffer_data()[0] < 0);
}

TEST_CASE("router health: loads sum to 1, entropy within [0, log E], max violation from counts", "[moe]") {
  RoutingStats st;
  st.reset(1, 4);
  st.tokens_per_expert[0] = {6, 2, 0, 0};
  st.assigned[0] = 8;
  st.dropped[0] = 2;
  const nlohmann::json h = st.health();
  CHECK(h[0]["load"] == nlohmann::json({0.75, 0.25, 0.0, 0.0}));
  CHECK(h[0]["max_violation"].get<double>() == Approx(6.0 / 2.0 - 1));
  CHECK(h[0]["dropped_frac"].get<double>() == Approx(0.25));

  Config cfg = small_config();
  Model m(cfg, 11);
  Rng init(1, 1);
  m.init(init);
  const auto x = batch(2 * 8, 11, 1);
  Graph g;
  RoutingStats live;
  ForwardOptions fo;
  fo.stats = &live;
  m.forward(g, x.data(), nullptr, 2, 8, fo);
  for (const auto& l : live.health()) {
    double total = 0;
    for (const auto& f : l["load"]) total += f.get<double>();
    CHECK(total == Approx(1.0));
    CHECK(l["router_entropy"].get<double>() > 0);
    CHECK(l["router_entropy"].get<double>() <= std::log(4.0) + 1e-9);
  }
}

TEST_CASE("gradient check: the MoE layer with router jitter and noise, each gating, group-limited", "[moe][gradcheck][jitter]") {
  // The whole layer: jitter and noise drawn from a generator made afresh for every evaluation,
  // the gating op, the grouped experts (gelu: no kinks); points whose routing flips are skipped.
  // relu and expert_choice: a variable number of experts per token (the probe's ids are -1 at
  // the slots not run, so a gate crossing zero or a token changing hands is a flip); top_k 4:
  // dense gating, K = E.
  const Gating gating = GENERATE(Gating::kTopkSoftmax, Gating::kSoftmaxTopk, Gating::kSigmoidTopk, Gating::kRelu,
                                 Gating::kExpertChoice);
  const bool renormalize = gating == Gating::kSoftmaxTopk ? GENERATE(false, true) : false;
  const int64_t groups = gating == Gating::kSigmoidTopk ? GENERATE(1, 2) : 1;  // group-limited: 2 groups of 2, 1 open
  const int64_t top_k = gating == Gating::kTopkSoftmax ? GENERATE(2, 4) : 2;
  INFO(name_of(gating) << (renormalize ? " renormalised" : "") << ", groups " << groups << ", top_k " << top_k);
  Config cfg = small_config();
  cfg.model.expert_ffn = ExpertFfn::kGelu;
  cfg.router.jitter = 0.2;
  cfg.router.noisy = true;
  cfg.router.gating = gating;
  cfg.router.renormalize = renormalize;
  if (gating == Gating::kSigmoidTopk) cfg.router.route_scale = 1.5;
  cfg.router.n_groups = groups;
  cfg.router.top_k = top_k;
  if (gating == Gating::kExpertChoice) cfg.router.capacity_factor = 1;
  ParamStore ps;
  std::vector<ParamRoleInfo> roles;
  ParamBuilder pb(ps, roles);
  const MoELayer moe = MoELayer::make(pb, "moe.", cfg);
  ps.finalize();
  const std::vector<float> w = random_vector(ps.numel(), 11, -0.4f, 0.4f);
  std::copy(w.begin(), w.end(), ps.data());
  Rng unused;
  std::vector<int64_t> load(4);
  MoEContext ctx;
  ctx.last_load = load.data();
  ctx.unused_rng = &unused;
  const int64_t N = 6, C = 16;
  REQUIRE_GRADCHECK({random_vector(N * C, 7)}, {{1, N, C}}, [&](Graph& g, const std::vector<Tensor>& in) {
    Rng noise(5, 3);
    std::vector<std::vector<int32_t>> chosen(1);
    ForwardOptions fo;
    fo.training = true;
    fo.noise_rng = &noise;
    fo.chosen = &chosen;
    return Probe{moe.forward(g, ps, in[0], 0, ctx, fo, nullptr), chosen[0]};
  });
}

TEST_CASE("a forward draws from the noise stream exactly the numbers Model::noise_per_forward declares", "[moe][rng]") {
  // Batched evaluation and the MPI shards place each batch's numbers by this count: a router
  // that drew more or fewer than it declares would shift every later batch's.
  // Dense blocks draw nothing: with dense_first 1 (of 2 blocks) one router draws, with 2 none.
  for (const int64_t dense_first : {0, 1, 2})
  for (const bool noisy : {false, true})
    for (const double jitter : {0.0, 0.1})
      for (const bool training : {false, true}) {
        INFO("dense_first " << dense_first << " noisy " << noisy << " jitter " << jitter << " training " << training);
        Config cfg = small_config();
        cfg.model.dense_first = dense_first;
        cfg.router.noisy = noisy;
        cfg.router.noise_at_eval = true;
        cfg.router.jitter = jitter;
        Model m(cfg, 11);
        Rng init(1, 1), noise(2, 3);
        m.init(init);
        const int64_t B = 2, T = 8;
        const std::vector<int32_t> x = batch(B * T, 11, 3);
        ForwardOptions fo;
        fo.training = training;
        fo.noise_rng = &noise;
        Graph g;
        m.forward(g, x.data(), x.data(), B, T, fo);
        CHECK(int64_t(noise.state().counter) == m.noise_per_forward(B * T, training));
        CHECK(m.noise_per_forward(B * T, training) ==
              (2 - dense_first) * B * T * ((training && jitter > 0 ? 16 : 0) + (noisy ? 4 : 0)));
      }
}
