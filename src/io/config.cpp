#include "moe/io/config.hpp"
#include "moe/io/json_excerpt.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <climits>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

namespace moe {

using nlohmann::json;

float Config::attention_scale() const {
  switch (model.attn_scale) {
    case AttnScale::kHead: return float(1.0 / std::sqrt(double(head_size())));
    case AttnScale::kEmbed: return float(1.0 / std::sqrt(double(model.n_embed)));
  }
  throw std::logic_error("attention_scale: unknown model.attn_scale");
}

int64_t Config::expert_matrices() const {
  switch (model.expert_ffn) {
    case ExpertFfn::kRelu:
    case ExpertFfn::kGelu: return 2;
    case ExpertFfn::kSwiglu: return 3;
  }
  throw std::logic_error("expert_matrices: unknown model.expert_ffn");
}

int64_t Config::moe_blocks() const {
  // The multiples of moe_every in [dense_first, n_layer), in closed form: validate() counts
  // them before it has refused absurd sizes.
  const int64_t k = model.moe_every;
  const auto multiples_below = [k](int64_t n) { return n <= 0 ? 0 : n / k + (n % k != 0); };  // in [0, n)
  return std::max<int64_t>(0, multiples_below(model.n_layer) - multiples_below(model.dense_first));
}

int64_t expert_capacity(const RouterConfig& r, int64_t rows) {
  return int64_t(std::ceil(r.capacity_factor * double(r.top_k * rows) / double(r.num_experts)));
}

int64_t slots_per_token(const RouterConfig& r) {
  return r.gating == Gating::kRelu || r.gating == Gating::kExpertChoice ? r.num_experts : r.top_k;
}

int64_t top_k_at(const RouterConfig& r, int64_t step) {
  const int64_t N = r.top_k_anneal_steps;
  if (N <= 0 || step >= N) return r.top_k;
  const double k = double(r.num_experts) - double(r.num_experts - r.top_k) * double(step) / double(N);
  return std::clamp(int64_t(std::llround(k)), r.top_k, r.num_experts);
}

int64_t Config::expert_capacity(int64_t rows) const { return moe::expert_capacity(router, rows); }

namespace {

// One config field: where it lives, how to read, write and check it.
struct Field {
  std::string section, name;
  std::function<json(const Config&)> get;
  std::function<void(Config&, const json&)> set;  // throws std::string (what is expected)
  std::function<std::string(const Config&)> check;  // "" or what is allowed
};

template <class T>
using Rule = std::function<std::string(const T&)>;

template <class T>
constexpr bool is_enum_option = std::is_enum_v<T>;

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, bool>) return "a boolean";
  else if constexpr (std::is_same_v<T, int64_t>) return "an integer";
  else if constexpr (std::is_same_v<T, double>) return "a number";
  else return "a string";
}

template <class T>
bool type_ok(const json& j) {
  if constexpr (std::is_same_v<T, bool>) return j.is_boolean();
  else if constexpr (std::is_same_v<T, int64_t>)  // 64 is fine as 64.0 too; 1e300 or 2^64 - 1 are not
    return (j.is_number_unsigned() && j.get<uint64_t>() <= uint64_t(INT64_MAX)) ||
           (j.is_number_integer() && !j.is_number_unsigned()) ||
           (j.is_number_float() && std::floor(j.get<double>()) == j.get<double>() && std::fabs(j.get<double>()) < 9e15);
  else if constexpr (std::is_same_v<T, double>) return j.is_number();
  else return j.is_string();
}

// "one of \"a\" \"b\"": what an enum option (or a string with a fixed set) allows.
template <class Names>
std::string one_of_text(const Names& allowed) {
  std::string s = "one of";
  for (const auto& a : allowed) s += " \"" + std::string(a) + "\"";
  return s;
}

template <class T>
json option_json(const T& v) {
  if constexpr (is_enum_option<T>) return json(name_of(v));
  else return json(v);
}

// An enum option from its config spelling; throws what is allowed.
template <class T>
T option_from_json(const json& j) {
  const std::string v = j.get<std::string>();
  const auto& names = EnumNames<T>::names;
  for (size_t i = 0; i < names.size(); ++i)
    if (v == names[i]) return T(i);
  throw one_of_text(names);
}

template <class S, class T>
Field field(const char* section, const char* name, S Config::*s, T S::*m, Rule<T> rule = {}) {
  Field f;
  f.section = section;
  f.name = name;
  f.get = [s, m](const Config& c) { return option_json((c.*s).*m); };
  f.set = [s, m](Config& c, const json& j) {
    if (!type_ok<T>(j)) throw std::string(type_name<T>());
    if constexpr (std::is_same_v<T, int64_t>) (c.*s).*m = j.is_number_float() ? int64_t(j.get<double>()) : j.get<int64_t>();
    else if constexpr (is_enum_option<T>) (c.*s).*m = option_from_json<T>(j);
    else (c.*s).*m = j.get<T>();
  };
  f.check = [s, m, rule](const Config& c) { return rule ? rule((c.*s).*m) : std::string(); };
  return f;
}

Rule<int64_t> positive() { return [](const int64_t& v) { return v > 0 ? "" : std::string("must be a positive integer"); }; }
Rule<int64_t> non_negative() { return [](const int64_t& v) { return v >= 0 ? "" : std::string("must be >= 0"); }; }
Rule<double> in_range(double lo, double hi, bool lo_open, bool hi_open) {
  return [=](const double& v) {
    const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
    if (ok) return std::string();
    std::ostringstream os;
    os << "must be in " << (lo_open ? "(" : "[") << lo << ", " << hi << (hi_open ? ")" : "]");
    return os.str();
  };
}
Rule<double> non_negative_number() {
  return [](const double& v) { return std::isfinite(v) && v >= 0 ? "" : std::string("must be a number >= 0"); };
}
Rule<double> positive_number() {
  return [](const double& v) { return std::isfinite(v) && v > 0 ? "" : std::string("must be a number > 0"); };
}
Rule<std::string> non_empty() { return [](const std::string& v) { return v.empty() ? std::string("must not be empty") : ""; }; }

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      field("data", "path", &Config::data, &DataConfig::path, non_empty()),
      field("data", "train_fraction", &Config::data, &DataConfig::train_fraction, in_range(0, 1, true, true)),
      field("model", "block_size", &Config::model, &ModelConfig::block_size, positive()),
      field("model", "n_embed", &Config::model, &ModelConfig::n_embed, positive()),
      field("model", "n_head", &Config::model, &ModelConfig::n_head, positive()),
      field("model", "n_layer", &Config::model, &ModelConfig::n_layer, positive()),
      field("model", "dropout", &Config::model, &ModelConfig::dropout, in_range(0, 1, false, true)),
      field("model", "expert_hidden", &Config::model, &ModelConfig::expert_hidden, non_negative()),
      field("model", "expert_ffn", &Config::model, &ModelConfig::expert_ffn),
      field("model", "shared_experts", &Config::model, &ModelConfig::shared_experts, non_negative()),
      field("model", "attn_scale", &Config::model, &ModelConfig::attn_scale),
      field("model", "init", &Config::model, &ModelConfig::init),
      field("model", "init_std", &Config::model, &ModelConfig::init_std, positive_number()),
      field("model", "norm", &Config::model, &ModelConfig::norm),
      field("model", "position", &Config::model, &ModelConfig::position),
      field("model", "rope_theta", &Config::model, &ModelConfig::rope_theta, positive_number()),
      field("model", "n_kv_head", &Config::model, &ModelConfig::n_kv_head, non_negative()),
      field("model", "qk_norm", &Config::model, &ModelConfig::qk_norm),
      field("model", "attention_kernel", &Config::model, &ModelConfig::attention_kernel),
      field("model", "moe_every", &Config::model, &ModelConfig::moe_every, positive()),
      field("model", "dense_first", &Config::model, &ModelConfig::dense_first, non_negative()),
      field("model", "dense_hidden", &Config::model, &ModelConfig::dense_hidden, non_negative()),
      field("model", "tie_embeddings", &Config::model, &ModelConfig::tie_embeddings),
      field("router", "num_experts", &Config::router, &RouterConfig::num_experts, positive()),
      field("router", "top_k", &Config::router, &RouterConfig::top_k, positive()),
      field("router", "noisy", &Config::router, &RouterConfig::noisy),
      field("router", "noise_at_eval", &Config::router, &RouterConfig::noise_at_eval),
      field("router", "gating", &Config::router, &RouterConfig::gating),
      field("router", "renormalize", &Config::router, &RouterConfig::renormalize),
      field("router", "aux_loss_coef", &Config::router, &RouterConfig::aux_loss_coef, non_negative_number()),
      field("router", "z_loss_coef", &Config::router, &RouterConfig::z_loss_coef, non_negative_number()),
      field("router", "capacity_factor", &Config::router, &RouterConfig::capacity_factor, non_negative_number()),
      field("router", "capacity_at_eval", &Config::router, &RouterConfig::capacity_at_eval),
      field("router", "bias_update_rate", &Config::router, &RouterConfig::bias_update_rate, non_negative_number()),
      field("router", "route_scale", &Config::router, &RouterConfig::route_scale, positive_number()),
      field("router", "n_groups", &Config::router, &RouterConfig::n_groups, positive()),
      field("router", "topk_groups", &Config::router, &RouterConfig::topk_groups, positive()),
      field("router", "jitter", &Config::router, &RouterConfig::jitter, in_range(0, 1, false, true)),
      field("router", "relu_l1_init", &Config::router, &RouterConfig::relu_l1_init, positive_number()),
      field("router", "relu_l1_growth", &Config::router, &RouterConfig::relu_l1_growth, in_range(1, 100, true, false)),
      field("router", "threshold_ema", &Config::router, &RouterConfig::threshold_ema, in_range(0, 1, false, true)),
      field("router", "top_k_anneal_steps", &Config::router, &RouterConfig::top_k_anneal_steps, non_negative()),
      field("optimizer", "lr", &Config::optimizer, &OptimizerConfig::lr, positive_number()),
      field("optimizer", "beta1", &Config::optimizer, &OptimizerConfig::beta1, in_range(0, 1, false, true)),
      field("optimizer", "beta2", &Config::optimizer, &OptimizerConfig::beta2, in_range(0, 1, false, true)),
      field("optimizer", "eps", &Config::optimizer, &OptimizerConfig::eps, positive_number()),
      field("optimizer", "weight_decay", &Config::optimizer, &OptimizerConfig::weight_decay, non_negative_number()),
      field("optimizer", "exempt_no_decay", &Config::optimizer, &OptimizerConfig::exempt_no_decay),
      field("optimizer", "grad_clip", &Config::optimizer, &OptimizerConfig::grad_clip, non_negative_number()),
      field("optimizer", "schedule", &Config::optimizer, &OptimizerConfig::schedule),
      field("optimizer", "warmup_steps", &Config::optimizer, &OptimizerConfig::warmup_steps, non_negative()),
      field("optimizer", "min_lr", &Config::optimizer, &OptimizerConfig::min_lr, non_negative_number()),
      field("training", "batch_size", &Config::training, &TrainingConfig::batch_size, positive()),
      field("training", "max_steps", &Config::training, &TrainingConfig::max_steps, non_negative()),
      field("training", "seed", &Config::training, &TrainingConfig::seed, non_negative()),
      field("training", "threads", &Config::training, &TrainingConfig::threads, non_negative()),
      field("training", "recompute", &Config::training, &TrainingConfig::recompute),
      field("training", "keep_activations", &Config::training, &TrainingConfig::keep_activations),
      field("training", "time_limit", &Config::training, &TrainingConfig::time_limit, non_negative_number()),
      field("training", "precision", &Config::training, &TrainingConfig::precision),
      field("training", "average_start", &Config::training, &TrainingConfig::average_start, non_negative()),
      field("training", "average_decay", &Config::training, &TrainingConfig::average_decay, in_range(0, 1, true, false)),
      field("logging", "log_interval", &Config::logging, &LoggingConfig::log_interval, positive()),
      field("logging", "eval_interval", &Config::logging, &LoggingConfig::eval_interval, positive()),
      field("logging", "eval_iters", &Config::logging, &LoggingConfig::eval_iters, positive()),
      field("logging", "checkpoint_interval", &Config::logging, &LoggingConfig::checkpoint_interval, non_negative()),
      field("logging", "out_dir", &Config::logging, &LoggingConfig::out_dir, non_empty()),
  };
  return table;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string suggestion(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = 1000;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(key, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best_d <= std::max<size_t>(2, key.size() / 3) ? best : "";
}

std::string line_col(const std::string& text, size_t byte) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') ++line, col = 1;
    else ++col;
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

}  // namespace

Config config_from_json(const json& j, const std::string& src) {
  if (!j.is_object()) throw ConfigError(src + ": the config must be a JSON object {...}, got " + std::string(j.type_name()));
  std::vector<std::string> sections;
  for (const Field& f : fields())
    if (sections.empty() || sections.back() != f.section) sections.push_back(f.section);
  Config c;
  for (auto& [sec, body] : j.items()) {
    if (std::find(sections.begin(), sections.end(), sec) == sections.end()) {
      std::string s = suggestion(sec, sections);
      std::string all;
      for (const auto& x : sections) all += (all.empty() ? "" : ", ") + x;
      throw ConfigError(src + ": unknown section '" + sec + "'" + (s.empty() ? "" : "; did you mean '" + s + "'?") +
                        " (sections: " + all + ")");
    }
    if (!body.is_object()) throw ConfigError(src + ": section '" + sec + "' must be a JSON object, got " + json_excerpt(body));
    for (auto& [key, value] : body.items()) {
      const Field* f = nullptr;
      std::vector<std::string> names;
      for (const Field& x : fields())
        if (x.section == sec) {
          names.push_back(x.name);
          if (x.name == key) f = &x;
        }
      if (!f) {
        std::string s = suggestion(key, names);
        throw ConfigError(src + ": unknown key '" + sec + "." + key + "'" +
                          (s.empty() ? "" : "; did you mean '" + sec + "." + s + "'?"));
      }
      try {
        f->set(c, value);
      } catch (const std::string& expected) {
        throw ConfigError(src + ": " + sec + "." + key + " = " + json_excerpt(value) + ": must be " + expected);
      }
    }
  }
  validate(c, src);
  return c;
}

void validate(const Config& c, const std::string& src) {
  for (const Field& f : fields()) {
    const std::string why = f.check(c);
    if (!why.empty()) throw ConfigError(src + ": " + f.section + "." + f.name + " = " + f.get(c).dump() + ": " + why);
  }
  auto fail = [&](const std::string& msg) { throw ConfigError(src + ": " + msg); };
  if (c.model.n_embed % c.model.n_head != 0)
    fail("model.n_embed = " + std::to_string(c.model.n_embed) + " must be divisible by model.n_head = " +
         std::to_string(c.model.n_head));
  const int64_t kv = c.kv_heads();
  if (kv > c.model.n_head)
    fail("model.n_kv_head = " + std::to_string(kv) + " must be at most model.n_head = " + std::to_string(c.model.n_head) +
         " (0 means n_head)");
  if (c.model.n_head % kv != 0)
    fail("model.n_head = " + std::to_string(c.model.n_head) + " must be a multiple of model.n_kv_head = " +
         std::to_string(kv) + " (each key/value head serves n_head / n_kv_head query heads)");
  if (c.model.position == PositionKind::kRope && c.model.n_embed % c.model.n_head == 0 && c.head_size() % 2 != 0)
    fail("model.position = \"rope\" needs an even head size (n_embed / n_head), got " +
         std::to_string(c.head_size()) + ": rope rotates pairs of channels");
  const int64_t layers = c.model.n_layer, moe_blocks = c.moe_blocks();
  if (c.model.dense_first > layers)
    fail("model.dense_first = " + std::to_string(c.model.dense_first) + " must be at most model.n_layer = " +
         std::to_string(layers) + " (n_layer: an all-dense model)");
  if (moe_blocks == 0 && c.model.dense_first < layers)
    fail("model.moe_every = " + std::to_string(c.model.moe_every) + " with model.dense_first = " +
         std::to_string(c.model.dense_first) + " leaves no MoE block among the " + std::to_string(layers) +
         " (block i is MoE when i >= dense_first and i % moe_every == 0); for an all-dense model set "
         "model.dense_first = model.n_layer");
  if (c.model.dense_hidden > 0 && moe_blocks == layers)
    fail("model.dense_hidden = " + std::to_string(c.model.dense_hidden) +
         " applies to dense blocks only, and every block is MoE (set model.moe_every > 1 or model.dense_first > 0)");
  if (c.training.recompute && c.training.keep_activations)
    fail("training.recompute and training.keep_activations ask for opposite things (drop a block's activations, "
         "keep them all): set one of them");
  if (c.router.top_k > c.router.num_experts)
    fail("router.top_k = " + std::to_string(c.router.top_k) + " must be at most router.num_experts = " +
         std::to_string(c.router.num_experts));
  const int64_t experts = c.router.num_experts, G = c.router.n_groups;
  if (experts % G != 0)
    fail("router.num_experts = " + std::to_string(experts) + " must be a multiple of router.n_groups = " +
         std::to_string(G));
  if (G > 64) fail("router.n_groups = " + std::to_string(G) + " must be at most 64");
  if (c.router.topk_groups > G)
    fail("router.topk_groups = " + std::to_string(c.router.topk_groups) + " must be at most router.n_groups = " +
         std::to_string(G));
  if (G > 1 && c.router.top_k > c.router.topk_groups * (experts / G))
    fail("router.top_k = " + std::to_string(c.router.top_k) + " must be at most the experts of the chosen groups, " +
         "router.topk_groups * num_experts / n_groups = " + std::to_string(c.router.topk_groups * (experts / G)));
  if (c.router.route_scale != 1 && c.router.gating != Gating::kSigmoidTopk)
    fail("router.route_scale applies to router.gating = \"sigmoid_topk\" only");
  if (c.router.renormalize && c.router.gating != Gating::kSoftmaxTopk)
    fail("router.renormalize applies to router.gating = \"softmax_topk\" only (topk_softmax weights already sum to 1)");
  const Gating gating = c.router.gating;
  if (gating == Gating::kRelu || gating == Gating::kExpertChoice) {
    const std::string g = std::string("router.gating = \"") + name_of(gating) + "\"";
    if (c.router.bias_update_rate > 0)
      fail("router.bias_update_rate applies to the top-k gatings only, not " + g + " (it shifts a top-k choice)");
    if (G > 1) fail("router.n_groups applies to the top-k gatings only, not " + g);
    if (c.router.top_k_anneal_steps > 0)
      fail("router.top_k_anneal_steps applies to the top-k gatings only, not " + g);
  }
  if (gating == Gating::kExpertChoice && !(c.router.capacity_factor > 0))
    fail("router.gating = \"expert_choice\" needs router.capacity_factor > 0: each expert takes capacity_factor * "
         "tokens * top_k / num_experts tokens (1 is the usual choice)");
  if (gating == Gating::kExpertChoice && c.router.capacity_at_eval)
    fail("router.capacity_at_eval does not apply to router.gating = \"expert_choice\": evaluation routes by the "
         "causal thresholds (see the README)");
  if (c.optimizer.min_lr > c.optimizer.lr)
    fail("optimizer.min_lr = " + json(c.optimizer.min_lr).dump() + " must not exceed optimizer.lr = " +
         json(c.optimizer.lr).dump());
  // Sizes are int64 and get multiplied together (4 * n_embed, B * T * 3C, B * H * T * T, times
  // the vocabulary, ...): refuse, before anything overflows, models far beyond any machine.
  // Computed in double, so the check itself cannot overflow.
  const double B = double(c.training.batch_size), T = double(c.model.block_size), C = double(c.model.n_embed),
               H = double(c.model.n_head), L = double(c.model.n_layer), E = double(c.router.num_experts),
               F = c.model.expert_hidden > 0 ? double(c.model.expert_hidden) : 4 * C,
               Fd = c.model.dense_hidden > 0 ? double(c.model.dense_hidden) : 4 * C,
               M = double(c.expert_matrices()), Lm = double(moe_blocks);
  const double kMaxElements = double(int64_t(1) << 40);
  const std::pair<const char*, double> sizes[] = {
      {"batch_size * block_size * max(3 * n_embed, expert and dense hidden sizes, num_experts) activations",
       B * T * std::max({3 * C, F, Fd, E})},
      {"batch_size * n_head * block_size^2 attention scores", B * H * T * T},
      {"parameters", T * C + L * 4 * C * C +
                         Lm * (2 * C * E + (E + double(c.model.shared_experts)) * M * C * F) + (L - Lm) * M * C * Fd},
  };
  for (const auto& [what, n] : sizes)
    if (n > kMaxElements)
      fail("the model is too large: " + std::string(what) + " = " + json(n).dump() + " elements, over the limit of 2^40");
}

json config_to_json(const Config& c) {
  json j = json::object();
  for (const Field& f : fields()) j[f.section][f.name] = f.get(c);
  return j;
}

Config parse_config(const std::string& text, const std::string& origin) {
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw ConfigError("config " + origin + ": the file is empty; write a JSON object, e.g. {\"training\": {\"max_steps\": 100}}");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    // nlohmann's text is "[json.exception...] parse error at line L, column C: <reason>"; the
    // position is given once, as line and column.
    const size_t p = what.find("parse error");
    const size_t colon = p == std::string::npos ? p : what.find(": ", p);
    throw ConfigError("config " + origin + ": invalid JSON at " + line_col(text, e.byte == 0 ? 0 : e.byte - 1) + ": " +
                      (colon == std::string::npos ? what : what.substr(colon + 2)));
  }
  return config_from_json(j, origin);
}

Config load_config(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw ConfigError("config " + path + ": is a directory; give the path of a JSON file");
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw ConfigError("config " + path + ": cannot open the file (" + std::strerror(errno) +
                      "; does it exist and is it readable?)");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), path);
}

}  // namespace moe
