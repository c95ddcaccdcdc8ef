#include "moe/inspect/inspect.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cmath>
#include <sstream>
#include <string_view>

#include "moe/train/evaluate.hpp"

namespace moe {

namespace {

constexpr int kClasses = int(std::size(kCharClasses));
constexpr int kPositions = int(std::size(kWordPositions));

bool is_letter(uint32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Which of kCharClasses code point c is in (a character may be in several: 'a' is lowercase
// and a vowel).
std::array<bool, kClasses> classes_of(uint32_t c) {
  const bool ascii = c < 128;
  const char ch = char(c);
  return {c >= 'a' && c <= 'z',
          c >= 'A' && c <= 'Z',
          ascii && std::string_view("aeiouAEIOU").find(ch) != std::string_view::npos,
          c == ' ',
          c == '\n',
          ascii && std::ispunct(static_cast<unsigned char>(ch)) != 0,
          c >= '0' && c <= '9'};
}

// Index into kWordPositions of the letter between prev and next (words are runs of letters).
int word_position(uint32_t prev, uint32_t c, uint32_t next) {
  if (!is_letter(c)) return 4;
  const bool before = is_letter(prev), after = is_letter(next);
  return before ? (after ? 1 : 2) : (after ? 0 : 3);
}

struct ExpertCounts {
  int64_t slots = 0;
  double gate_sum = 0;
  std::vector<int64_t> chars;                   // [V]
  std::array<int64_t, kPositions> positions{};  // slots per word position
};

// Character id as shown in reports: newline and space made visible.
std::string printable(const Tokenizer& tok, int32_t id) {
  const uint32_t c = tok.vocab()[size_t(id)];
  if (c == '\n') return "\\n";
  if (c == ' ') return "␣";
  return tok.decode({id});
}

}  // namespace

nlohmann::json inspect_split(Model& model, const Tokenizer& tokenizer, TokenSpan ids, const InspectOptions& opt) {
  const Config& cfg = model.config();
  const int64_t E = cfg.router.num_experts, K = cfg.router.top_k, V = model.vocab_size();
  // The MoE blocks (a dense block has no router): layer i of the report is block moe[i].
  std::vector<int64_t> moe;
  for (int64_t l = 0; l < cfg.model.n_layer; ++l)
    if (cfg.moe_block(l)) moe.push_back(l);
  const auto L = int64_t(moe.size());
  if (slots_per_token(cfg.router) != K)
    throw std::runtime_error(std::string("moe inspect reads a fixed top_k experts per token; router.gating \"") +
                             name_of(cfg.router.gating) + "\" varies it (use moe eval's router health)");
  const std::vector<uint32_t>& vocab = tokenizer.vocab();
  std::vector<std::vector<ExpertCounts>> counts(static_cast<size_t>(L), std::vector<ExpertCounts>(static_cast<size_t>(E)));
  for (auto& layer : counts)
    for (auto& c : layer) c.chars.assign(size_t(V), 0);
  std::vector<int64_t> corpus_chars(size_t(V), 0);
  std::array<int64_t, kPositions> corpus_positions{};
  // joint[l][a * E + b]: tokens whose first choice is a in MoE layer l and b in the next one.
  std::vector<std::vector<int64_t>> joint(size_t(std::max<int64_t>(L - 1, 0)), std::vector<int64_t>(size_t(E * E), 0));
  int64_t tokens = 0;

  const auto code = [&](size_t i) { return i < ids.size() ? vocab[size_t(ids[i])] : uint32_t(0); };
  Graph g;
  const int64_t batch = opt.batch_size > 0 ? opt.batch_size : cfg.training.batch_size;
  const SplitEvaluation ev = evaluate_split(model, ids, batch, g, [&](const RoutedBatch& rb) {
    for (int64_t n = 0; n < rb.B * rb.T; ++n) {
      const size_t at = size_t(rb.first_window * rb.T + n);  // rows are consecutive windows
      const int32_t id = rb.x[n];
      const int pos = word_position(at > 0 ? code(at - 1) : 0, vocab[size_t(id)], code(at + 1));
      ++corpus_chars[size_t(id)];
      ++corpus_positions[size_t(pos)];
      ++tokens;
      for (int64_t l = 0; l < L; ++l) {
        const int32_t* chosen = (*rb.chosen)[size_t(moe[size_t(l)])].data() + n * K;
        const float* w = (*rb.weights)[size_t(moe[size_t(l)])].data() + n * K;
        for (int64_t k = 0; k < K; ++k) {
          ExpertCounts& c = counts[size_t(l)][size_t(chosen[k])];
          ++c.slots;
          c.gate_sum += double(w[k]);
          ++c.chars[size_t(id)];
          ++c.positions[size_t(pos)];
        }
        if (l + 1 < L) ++joint[size_t(l)][size_t(chosen[0] * E + (*rb.chosen)[size_t(moe[size_t(l + 1)])][size_t(n * K)])];
      }
    }
  });

  // Corpus shares: of characters, classes and word positions.
  std::vector<double> char_freq(static_cast<size_t>(V));
  std::array<double, kClasses> class_freq{};
  for (int64_t v = 0; v < V; ++v) {
    char_freq[size_t(v)] = double(corpus_chars[size_t(v)]) / double(tokens);
    const auto in = classes_of(vocab[size_t(v)]);
    for (int c = 0; c < kClasses; ++c)
      if (in[size_t(c)]) class_freq[size_t(c)] += char_freq[size_t(v)];
  }
  std::array<double, kPositions> position_freq{};
  for (int p = 0; p < kPositions; ++p) position_freq[size_t(p)] = double(corpus_positions[size_t(p)]) / double(tokens);

  nlohmann::json report;
  report["tokens"] = tokens;
  report["loss"] = ev.loss;
  report["layers_count"] = cfg.model.n_layer;  // blocks; "layers" lists the MoE ones
  report["experts"] = E;
  report["top_k"] = K;
  report["classes"] = kCharClasses;
  report["positions"] = kWordPositions;
  nlohmann::json vocab_json = nlohmann::json::array();
  for (int64_t v = 0; v < V; ++v) vocab_json.push_back(printable(tokenizer, int32_t(v)));
  report["vocab"] = vocab_json;
  report["corpus"] = {{"chars", char_freq}, {"classes", class_freq}, {"positions", position_freq}};

  const double slots_per_layer = double(tokens * K);
  nlohmann::json layers = nlohmann::json::array();
  for (int64_t l = 0; l < L; ++l) {
    nlohmann::json experts = nlohmann::json::array();
    for (int64_t e = 0; e < E; ++e) {
      const ExpertCounts& c = counts[size_t(l)][size_t(e)];
      const double slots = std::max<double>(1, double(c.slots));
      // Lift of each character: its share of this expert's slots over its share of the split.
      std::vector<double> char_lift(size_t(V), 0.0);
      std::array<double, kClasses> class_share{}, class_lift{};
      for (int64_t v = 0; v < V; ++v) {
        const double share = double(c.chars[size_t(v)]) / slots;
        if (char_freq[size_t(v)] > 0) char_lift[size_t(v)] = share / char_freq[size_t(v)];
        const auto in = classes_of(vocab[size_t(v)]);
        for (int k = 0; k < kClasses; ++k)
          if (in[size_t(k)]) class_share[size_t(k)] += share;
      }
      for (int k = 0; k < kClasses; ++k)
        class_lift[size_t(k)] = class_freq[size_t(k)] > 0 ? class_share[size_t(k)] / class_freq[size_t(k)] : 0;
      std::array<double, kPositions> position_share{}, position_lift{};
      for (int p = 0; p < kPositions; ++p) {
        position_share[size_t(p)] = double(c.positions[size_t(p)]) / slots;
        position_lift[size_t(p)] =
            position_freq[size_t(p)] > 0 ? position_share[size_t(p)] / position_freq[size_t(p)] : 0;
      }
      std::vector<int64_t> order;
      for (int64_t v = 0; v < V; ++v)
        if (corpus_chars[size_t(v)] >= opt.min_count && c.chars[size_t(v)] > 0) order.push_back(v);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return char_lift[size_t(a)] > char_lift[size_t(b)]; });
      if (int64_t(order.size()) > opt.top_chars) order.resize(size_t(opt.top_chars));
      nlohmann::json top = nlohmann::json::array();
      for (int64_t v : order)
        top.push_back({{"char", vocab_json[size_t(v)]},
                       {"lift", char_lift[size_t(v)]},
                       {"count", c.chars[size_t(v)]},
                       {"share_of_char", double(c.chars[size_t(v)]) / double(corpus_chars[size_t(v)])}});
      experts.push_back({{"expert", e},
                         {"slot_share", double(c.slots) / slots_per_layer},
                         {"mean_gate", c.slots > 0 ? c.gate_sum / double(c.slots) : 0.0},
                         {"top_chars", top},
                         {"class_share", class_share},
                         {"class_lift", class_lift},
                         {"position_share", position_share},
                         {"position_lift", position_lift},
                         {"char_lift", char_lift}});
    }
    layers.push_back({{"layer", moe[size_t(l)]}, {"experts", experts}});
  }
  report["layers"] = layers;

  // MoE layer l's first choice against the next one's: mutual information, and how often the
  // most likely successor of each expert is right (against always guessing the commonest one).
  nlohmann::json transitions = nlohmann::json::array();
  for (int64_t l = 0; l + 1 < L; ++l) {
    const std::vector<int64_t>& j = joint[size_t(l)];
    std::vector<double> pa(size_t(E), 0), pb(size_t(E), 0);
    for (int64_t a = 0; a < E; ++a)
      for (int64_t b = 0; b < E; ++b) {
        const double p = double(j[size_t(a * E + b)]) / double(tokens);
        pa[size_t(a)] += p;
        pb[size_t(b)] += p;
      }
    double mi = 0, hb = 0, hits = 0;
    for (int64_t a = 0; a < E; ++a) {
      double best = 0;
      for (int64_t b = 0; b < E; ++b) {
        const double p = double(j[size_t(a * E + b)]) / double(tokens);
        if (p > 0) mi += p * std::log2(p / (pa[size_t(a)] * pb[size_t(b)]));
        best = std::max(best, p);
      }
      hits += best;
    }
    for (double p : pb)
      if (p > 0) hb -= p * std::log2(p);
    transitions.push_back({{"from", moe[size_t(l)]},
                           {"to", moe[size_t(l + 1)]},
                           {"mutual_information_bits", mi},
                           {"next_entropy_bits", hb},
                           {"normalized_mi", hb > 0 ? mi / hb : 0.0},
                           {"prediction_accuracy", hits},
                           {"baseline_accuracy", *std::max_element(pb.begin(), pb.end())},
                           {"joint", j}});
  }
  report["transitions"] = transitions;
  return report;
}

std::string inspect_summary(const nlohmann::json& r) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "%lld tokens, loss %.4f, %lld experts per layer, top-%lld\n",
                (long long)r["tokens"].get<int64_t>(), r["loss"].get<double>(), (long long)r["experts"].get<int64_t>(),
                (long long)r["top_k"].get<int64_t>());
  out << line;
  if (r["layers"].empty()) out << "no MoE layers (an all-dense model): nothing routed\n";
  for (const auto& layer : r["layers"]) {
    out << "layer " << layer["layer"].get<int64_t>() << ":\n";
    for (const auto& e : layer["experts"]) {
      // The class the expert favours most, by lift.
      const auto& lift = e["class_lift"];
      size_t best = 0;
      for (size_t k = 1; k < lift.size(); ++k)
        if (lift[k].get<double>() > lift[best].get<double>()) best = k;
      std::snprintf(line, sizeof line, "  expert %lld: slots %5.1f%% | gate %.3f | most %s (x%.2f) | chars",
                    (long long)e["expert"].get<int64_t>(), 100 * e["slot_share"].get<double>(),
                    e["mean_gate"].get<double>(), kCharClasses[best], lift[best].get<double>());
      out << line;
      for (const auto& c : e["top_chars"]) out << " " << c["char"].get<std::string>();
      out << "\n";
    }
  }
  for (const auto& t : r["transitions"]) {
    std::snprintf(line, sizeof line,
                  "layer %lld -> %lld: mutual information %.3f bits (%.1f%% of H), first choice predicted %.1f%% "
                  "(commonest %.1f%%)\n",
                  (long long)t["from"].get<int64_t>(), (long long)t["to"].get<int64_t>(),
                  t["mutual_information_bits"].get<double>(), 100 * t["normalized_mi"].get<double>(),
                  100 * t["prediction_accuracy"].get<double>(), 100 * t["baseline_accuracy"].get<double>());
    out << line;
  }
  return out.str();
}

}  // namespace moe
