#include "moe/nn/moe.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/dist/comm.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/nn/remake.hpp"

namespace moe {

namespace {

// Router health of one forward from the clean logits [N, E] and the slots each expert was
// chosen for: adds the entropy and logsumexp² of every token and the Switch aux value
// E · Σ_i f_i P_i.
void record_router_health(Graph& g, RoutingStats& st, int64_t layer, const float* clean, int64_t N, int64_t E,
                          const int32_t* chosen, int64_t dropped, const RoutingPlan* variable) {
  const size_t l = size_t(layer);
  if (variable) {  // experts per token: the rows the plan runs for each
    int32_t* count = g.arena().alloc_ints(N);
    std::fill(count, count + N, 0);
    for (int64_t s = 0; s < variable->rows(); ++s) ++count[variable->token[s]];
    st.variable = true;
    for (int64_t n = 0; n < N; ++n) {
      st.per_token_sum[l] += count[n];
      st.per_token_sq[l] += double(count[n]) * count[n];
      st.per_token_min[l] = std::min<int64_t>(st.per_token_min[l], count[n]);
      st.per_token_max[l] = std::max<int64_t>(st.per_token_max[l], count[n]);
    }
  }
  // Chunks of tokens, in parallel (an exp and a log per token and expert), each with its own
  // sums {entropy, z, P[0..E)} and scratch p[E], added up in chunk order: the same figures for
  // any thread count.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (N + kChunk - 1) / kChunk, width = 2 + 2 * E;
  auto* part = static_cast<double*>(g.arena().alloc_bytes(sizeof(double) * size_t(chunks * width + E)));
#pragma omp parallel for schedule(static) if (N * E >= 2048)
  for (int64_t c = 0; c < chunks; ++c) {
    double* sums = part + c * width;  // entropy, z, P[E]
    double *P = sums + 2, *p = P + E;
    std::fill(sums, sums + 2 + E, 0.0);
    for (int64_t n = c * kChunk; n < std::min(N, (c + 1) * kChunk); ++n) {
      const float* r = clean + n * E;
      const double mx = *std::max_element(r, r + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(double(r[e]) - mx));
      const double lse = mx + std::log(sum);
      sums[1] += lse * lse;
      for (int64_t e = 0; e < E; ++e) {
        const double q = p[e] / sum;
        P[e] += q / double(N);
        if (q > 0) sums[0] -= q * std::log(q);
      }
    }
  }
  double entropy = 0, z = 0;
  double* P = part + chunks * width;  // Σ over tokens of each expert's probability / N
  std::fill(P, P + E, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    const double* sums = part + c * width;
    entropy += sums[0], z += sums[1];
    for (int64_t e = 0; e < E; ++e) P[e] += sums[2 + e];
  }
  int64_t slots = 0;
  for (int64_t e = 0; e < E; ++e) slots += chosen[e];
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) {
    st.tokens_per_expert[l][size_t(e)] += chosen[e];
    aux += double(chosen[e]) / double(slots) * P[e];
  }
  st.assigned[l] += slots;
  st.dropped[l] += dropped;
  st.tokens[l] += N;
  st.forwards[l] += 1;
  st.entropy_sum[l] += entropy;
  st.z_sum[l] += z;
  st.aux_sum[l] += aux;  // a plain sum (E applies in health()): adding up parts gives it
}

// What the executors share: the layer's experts and how they run.
struct Executor {
  Graph& g;
  const ParamStore& ps;
  const std::vector<Expert>& experts;
  ExpertFfn kind;
  float p;  // dropout over the experts' outputs (0 outside training)
  const ForwardOptions& opt;
  Rng& drop;  // the dropout stream, or a never-drawn one
  int64_t C, E;
};

// One process: every expert at once. Grouped ops run the experts on separate threads, each
// product on one, in place of some hundred small parallel products a layer. The same numbers
// as the per-expert executor in one process: one dropout draw over the rows in expert order is
// the experts' draws one after the other, and the gather and the weighted sum add in its order.
void run_grouped(const Executor& ex, Tensor& acc, const Tensor& xf, const Tensor& weights, const RoutingPlan& plan) {
  const int64_t S = plan.rows();
  if (S == 0) return;
  Graph& g = ex.g;
  Remake mem(g);  // the gathered rows: made again in the backward pass, after the experts read them
  const Tensor xs = gather_row_groups(g, xf, plan.token, plan.offsets, ex.E, mem.next());  // (S, C) by expert
  const Tensor y = grouped_experts(g, ex.ps, ex.experts, ex.kind, xs, plan.offsets);
  const Tensor ys = dropout(g, y, ex.p, ex.opt.training, ex.drop, true);  // over the experts' outputs
  index_add_weighted(g, acc, ys, plan.token, weights, plan.gate_pos, S);
  mem.record();
}

// Data parallel, R processes with the same experts: expert by expert over this process's rows,
// each expert's dropout drawn over the rows of every process in process order, what one process
// with the whole batch would draw for these rows. kept(r, e): rows process r keeps for e.
template <class Kept>
void run_per_expert(const Executor& ex, Tensor& acc, const Tensor& xf, const Tensor& weights, const RoutingPlan& plan,
                    int64_t R, int64_t me, Kept kept) {
  const bool drawn = ex.opt.training && ex.p > 0 && ex.opt.dropout_rng;
  for (int64_t e = 0; e < ex.E; ++e) {
    const int64_t begin = plan.offsets[e], n = plan.offsets[e + 1] - begin;
    Rng window;  // this process's rows' numbers of expert e's draw
    if (drawn) {
      int64_t before = 0, total = 0;
      for (int64_t r = 0; r < R; ++r) {
        if (r < me) before += kept(r, e);
        total += kept(r, e);
      }
      window = ex.opt.dropout_rng->take_window(uint64_t(before * ex.C), uint64_t(total * ex.C));
    }
    if (n == 0) continue;  // only the chosen experts compute
    const Tensor ye = ex.experts[size_t(e)].forward(ex.g, ex.ps, gather_rows(ex.g, xf, plan.token + begin, n), ex.kind,
                                                    ex.p, ex.opt.training, drawn ? window : ex.drop);  // (n, C)
    index_add_weighted(ex.g, acc, ye, plan.token + begin, weights, plan.gate_pos + begin, n);
  }
}

// Expert parallel: the kept rows, sorted by expert, go to the experts' owners (experts of one
// owner are consecutive); each expert runs once over its rows from every rank, in rank order
// (the order one process would see them in), and the outputs come back to the ranks the rows
// came from, in their original order. The other experts' dropout numbers are skipped.
template <class Kept>
void run_all_to_all(const Executor& ex, Tensor& acc, const Tensor& xf, const Tensor& weights, const RoutingPlan& plan,
                    const MoEContext& ctx, Kept kept) {
  Graph& g = ex.g;
  const int64_t R = ctx.ranks, El = ex.E / R, S = plan.rows(), rank = ctx.rank;
  auto* send = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(2 * R)));
  int64_t* recv = send + R;
  int64_t* block = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(R)));  // first row from src
  int64_t received = 0;
  for (int64_t r = 0; r < R; ++r) {
    send[r] = plan.offsets[(r + 1) * El] - plan.offsets[r * El];
    recv[r] = 0;
    for (int64_t e = rank * El; e < (rank + 1) * El; ++e) recv[r] += kept(r, e);
    block[r] = received;
    received += recv[r];
  }
  Tensor xr = exchange_rows(g, gather_rows(g, xf, plan.token, S), send, recv);  // (received, C)
  Tensor yr = g.zeros({received, ex.C}, g.grad_enabled());
  Tensor ones = g.new_tensor({std::max<int64_t>(1, received)}, false);
  std::fill(ones.data, ones.data + ones.numel(), 1.f);
  const bool drawn = ex.opt.training && ex.p > 0 && ex.opt.dropout_rng;
  for (int64_t e = 0; e < ex.E; ++e) {
    int64_t n = 0;
    for (int64_t r = 0; r < R; ++r) n += kept(r, e);
    Rng window;  // expert e's draw over its rows from every rank
    if (drawn) window = ex.opt.dropout_rng->take_window(0, uint64_t(n * ex.C));
    if (ctx.expert_owner(e, ex.E) != rank || n == 0) continue;
    int32_t* rows = g.arena().alloc_ints(n);
    int64_t i = 0;
    for (int64_t r = 0; r < R; ++r) {
      int64_t first = block[r];
      for (int64_t e2 = rank * El; e2 < e; ++e2) first += kept(r, e2);
      for (int64_t j = 0; j < kept(r, e); ++j) rows[i++] = int32_t(first + j);
    }
    const Tensor ye = ex.experts[size_t(e)].forward(g, ex.ps, gather_rows(g, xr, rows, n), ex.kind, ex.p,
                                                    ex.opt.training, drawn ? window : ex.drop);  // (n, C)
    index_add_weighted(g, yr, ye, rows, ones, rows, n);
  }
  const Tensor ys = exchange_rows(g, yr, recv, send);  // (S, C), back in this rank's row order
  index_add_weighted(g, acc, ys, plan.token, weights, plan.gate_pos, S);
}

}  // namespace

MoELayer MoELayer::make(ParamBuilder& pb, const std::string& prefix, const Config& cfg) {
  MoELayer m;
  m.kind_ = cfg.model.expert_ffn;
  m.dropout_ = float(cfg.model.dropout);
  m.aux_coef_ = cfg.router.aux_loss_coef;
  m.z_coef_ = cfg.router.z_loss_coef;
  m.l1_ = cfg.router.gating == Gating::kRelu;
  m.C_ = cfg.model.n_embed;
  m.E_ = cfg.router.num_experts;
  m.F_ = cfg.expert_hidden_size();
  m.router = Router::make(pb, prefix + "router.", m.C_, cfg.router);
  for (int64_t e = 0; e < m.E_; ++e)
    m.experts.push_back(Expert::make(pb, prefix + "experts." + std::to_string(e) + ".", m.C_, m.F_, m.kind_));
  for (int64_t e = 0; e < cfg.model.shared_experts; ++e)
    m.shared.push_back(Expert::make(pb, prefix + "shared." + std::to_string(e) + ".", m.C_, m.F_, m.kind_));
  return m;
}

Tensor MoELayer::forward(Graph& g, const ParamStore& ps, const Tensor& x, int64_t layer, const MoEContext& ctx,
                         const ForwardOptions& opt, RouterLosses* losses) const {
  PartScope part(Part::Routing);
  const int64_t N = x.rows(), E = E_;
  const Tensor xf = x.view({N, C_});  // (N, C)
  float* kth = opt.training && ctx.last_kth ? g.arena().alloc_floats(E) : nullptr;  // expert choice: this batch's
  const Router::Routed r = router.forward(g, ps, xf, layer, {ctx.bias, ctx.thresholds, kth}, opt);
  const RoutingPlan& plan = r.plan;
  if (opt.chosen) {  // relu and expert choice: per token and expert, e where it runs, else -1
    auto& ids = (*opt.chosen)[size_t(layer)];
    if (router.variable()) {
      ids.assign(size_t(N * plan.K), -1);
      for (int64_t i = 0; i < N * plan.K; ++i)
        if (plan.weights[i] != 0.f) ids[size_t((i / plan.K) * plan.K + plan.index[i])] = plan.index[i];
    } else {
      ids.assign(plan.index, plan.index + N * plan.K);
    }
  }
  if (opt.chosen_weights) (*opt.chosen_weights)[size_t(layer)].assign(plan.weights, plan.weights + N * plan.K);
  if (opt.stats)
    record_router_health(g, *opt.stats, layer, r.clean.data, N, E, plan.chosen, plan.dropped,
                         router.variable() ? &plan : nullptr);

  // Slots per expert, chosen (before any capacity drops) and kept: counts[r][e] and
  // counts[r][E + e] for process r, every process of a distributed forward, else this one.
  const bool dist = opt.distributed && ctx.ranks > 1;
  const int64_t R = dist ? ctx.ranks : 1, me = dist ? ctx.rank : 0;
  auto* mine = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(2 * E)));
  auto* counts = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(R * 2 * E)));
  for (int64_t e = 0; e < E; ++e) {
    mine[e] = plan.chosen[e];
    mine[E + e] = plan.offsets[e + 1] - plan.offsets[e];
  }
  if (dist)
    dist::allgather(mine, counts, 2 * E);
  else
    std::copy(mine, mine + 2 * E, counts);
  const auto kept = [counts, E](int64_t rank, int64_t e) { return counts[rank * 2 * E + E + e]; };
  int32_t* slots = g.arena().alloc_ints(E);  // chosen over the global batch
  for (int64_t e = 0; e < E; ++e) {
    int64_t c = 0;
    for (int64_t q = 0; q < R; ++q) c += counts[q * 2 * E + e];
    slots[e] = int32_t(c);
    if (opt.training) ctx.last_load[e] = c;
  }
  if (opt.training && ctx.last_tokens) *ctx.last_tokens = N * R;
  if (opt.training && kth) {  // the mean of the processes' C-th scores, added in rank order
    auto* bits = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t((R + 1) * E)));
    int64_t* all = bits + E;
    for (int64_t e = 0; e < E; ++e) {
      uint32_t b;
      std::memcpy(&b, kth + e, sizeof b);
      bits[e] = int64_t(b);
    }
    if (dist)
      dist::allgather(bits, all, E);
    else
      std::copy(bits, bits + E, all);
    for (int64_t e = 0; e < E; ++e) {
      double sum = 0;
      for (int64_t q = 0; q < R; ++q) {
        const auto b = uint32_t(all[q * E + e]);
        float v;
        std::memcpy(&v, &b, sizeof v);
        sum += double(v);
      }
      ctx.last_kth[e] = float(sum / double(R));
    }
  }

  // Balancing losses from the clean logits and the router's choices (before any capacity).
  {
    Graph::KeepGrads added_after_the_blocks(g);
    if (losses && aux_coef_ > 0) losses->aux.push(switch_aux_loss(g, r.clean, slots));
    if (losses && z_coef_ > 0) losses->z.push(router_z_loss(g, r.clean));
    if (losses && l1_) losses->l1.push(scale(g, sum(g, r.weights), 1.f / float(N)));
  }

  const float p = opt.training ? dropout_ : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : *ctx.unused_rng;
  const Executor ex{g, ps, experts, kind_, p, opt, drop, C_, E};
  Tensor acc = g.zeros({N, C_}, g.grad_enabled());  // (N, C)
  if (!dist)
    run_grouped(ex, acc, xf, r.weights, plan);
  else if (ctx.expert_parallel)
    run_all_to_all(ex, acc, xf, r.weights, plan, ctx, kept);
  else
    run_per_expert(ex, acc, xf, r.weights, plan, R, me, kept);
  Tensor out = acc;
  for (const Expert& sp : shared) out = add(g, out, sp.forward(g, ps, xf, kind_, p, opt.training, drop));
  return out.view(x.shape);
}

void MoELayer::decode(const ParamStore& ps, KVCache::Work& w, int64_t n, const MoEContext& ctx,
                      const ForwardOptions& opt) const {
  const RoutingPlan plan = router.decode(ps, w, n, {ctx.bias, ctx.thresholds, nullptr}, opt);
  DecodeProfile* prof = opt.profile;
  if (prof) prof->lap(DecodeProfile::kRouter);
  const float* x = w.normed.data();
  // Each routed row s owns row s of rows, hidden and expert_out, so the chosen experts run on
  // separate threads (one team per layer; their products run serially inside it).
  int32_t* active = w.active.data();
  int64_t n_active = 0;
  for (int64_t e = 0; e < E_; ++e)
    if (plan.offsets[e + 1] > plan.offsets[e]) active[n_active++] = int32_t(e);
  float* rows = w.rows.data();
  float* ye = w.expert_out.data();
  const auto run = [&](int64_t a) {
    const int64_t e = active[a], begin = plan.offsets[e], count = plan.offsets[e + 1] - begin;
    for (int64_t s = begin; s < begin + count; ++s)
      std::memcpy(rows + s * C_, x + int64_t(plan.token[s]) * C_, sizeof(float) * size_t(C_));
    experts[size_t(e)].decode(ps, kind_, rows + begin * C_, count, w.hidden.data() + begin * F_,
                              w.hidden3.data() + begin * F_, ye + begin * C_);
  };
  double wait = 0;  // profiling: the region's time that no thread spent running experts
  if (n_active > 1 && omp_get_max_threads() > 1) {
    const double t0 = prof ? DecodeProfile::now() : 0;
    double busy = 0;
#pragma omp parallel
    {
      const double start = prof ? DecodeProfile::now() : 0;
      gemm_reserve_thread(std::max(C_, F_));  // whichever expert this thread draws
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t a = 0; a < n_active; ++a) run(a);
      if (prof) {
        const double mine = DecodeProfile::now() - start;
#pragma omp critical(moe_decode_profile)
        busy = std::max(busy, mine);
      }
    }
    if (prof) wait = DecodeProfile::now() - t0 - busy;
  } else {  // one thread: no OpenMP region at all
    for (int64_t a = 0; a < n_active; ++a) run(a);
  }
  float* acc = w.sub.data();
  std::fill(acc, acc + n * C_, 0.f);
  for (int64_t e = 0; e < E_; ++e) {  // in expert order, as forward adds them
    const int64_t begin = plan.offsets[e], count = plan.offsets[e + 1] - begin;
    scatter_add_weighted(acc, ye + begin * C_, plan.token + begin, plan.weights, plan.gate_pos + begin, count, C_);
  }
  for (const Expert& sp : shared) {
    sp.decode(ps, kind_, x, n, w.hidden.data(), w.hidden3.data(), ye);
    for (int64_t i = 0; i < n * C_; ++i) acc[i] = acc[i] + ye[i];
  }
  if (prof) prof->lap(DecodeProfile::kExperts, wait);
}

}  // namespace moe
