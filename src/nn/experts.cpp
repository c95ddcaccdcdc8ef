#include "moe/nn/experts.hpp"

#include "moe/ops/ops.hpp"

namespace moe {

Activation expert_activation(ExpertFfn kind) {
  switch (kind) {
    case ExpertFfn::kRelu: return Activation::kRelu;
    case ExpertFfn::kGelu: return Activation::kGelu;
    case ExpertFfn::kSwiglu: return Activation::kSilu;
  }
  throw std::logic_error("expert_activation: unknown model.expert_ffn");
}

Expert Expert::make(ParamBuilder& pb, const std::string& q, int64_t C, int64_t F, ExpertFfn kind) {
  Expert ep;
  const bool swiglu = kind == ExpertFfn::kSwiglu;  // Mixtral's form, without biases
  ep.fc1 = Linear::make(pb, q + "fc1", C, F, !swiglu);
  ep.fc2 = Linear::make(pb, q + "fc2", F, C, !swiglu);
  if (swiglu) ep.fc3 = Linear::make(pb, q + "fc3", C, F, false);
  return ep;
}

Tensor Expert::forward(Graph& g, const ParamStore& ps, const Tensor& x, ExpertFfn kind, float p, bool training,
                       Rng& rng) const {
  Tensor h = linear_act(g, x, ps.get(fc1.weight), fc1.bias_tensor(ps), expert_activation(kind));  // (n, F)
  if (kind == ExpertFfn::kSwiglu) h = mul(g, h, fc3.forward(g, ps, x));
  return dropout(g, fc2.forward(g, ps, h), p, training, rng, true);  // (n, C), over fc2's output
}

void Expert::decode(const ParamStore& ps, ExpertFfn kind, const float* x, int64_t n, float* hidden, float* hidden3,
                    float* y) const {
  const int64_t m = n * fc1.out;
  fc1.decode(ps, x, n, hidden);
  act::dispatch(expert_activation(kind), [&](auto f, auto) {
    for (int64_t i = 0; i < m; ++i) hidden[i] = f(hidden[i]);
  });
  if (kind == ExpertFfn::kSwiglu) {  // silu(fc1 x) ⊙ fc3 x, as mul() computes it
    fc3.decode(ps, x, n, hidden3);
    for (int64_t i = 0; i < m; ++i) hidden[i] = hidden[i] * hidden3[i];
  }
  fc2.decode(ps, hidden, n, y, kind == ExpertFfn::kRelu);  // most of a relu's output is 0
}

Tensor grouped_experts(Graph& g, const ParamStore& ps, const std::vector<Expert>& experts, ExpertFfn kind,
                       const Tensor& xs, const int32_t* offsets) {
  PartScope part(Part::GemmExpert);
  const auto E = int64_t(experts.size());
  Tensor* t = g.arena().alloc_objects<Tensor>(6 * E);  // w1, b1, w2, b2, w3, b3: E each
  for (int64_t e = 0; e < E; ++e) {
    const Expert& ep = experts[size_t(e)];
    const Linear* lps[3] = {&ep.fc1, &ep.fc2, &ep.fc3};
    for (int j = 0; j < 3; ++j) {
      t[(2 * j) * E + e] = lps[j]->weight >= 0 ? ps.get(lps[j]->weight) : Tensor{};
      t[(2 * j + 1) * E + e] = lps[j]->bias_tensor(ps);
    }
  }
  const Activation act = expert_activation(kind);
  if (kind == ExpertFfn::kSwiglu) {
    Tensor h = grouped_linear(g, xs, offsets, E, t, t + E, &act);
    h = mul(g, h, grouped_linear(g, xs, offsets, E, t + 4 * E, t + 5 * E));
    return grouped_linear(g, h, offsets, E, t + 2 * E, t + 3 * E);
  }
  return grouped_mlp(g, xs, offsets, E, t, t + E, act, t + 2 * E, t + 3 * E);
}

}  // namespace moe
