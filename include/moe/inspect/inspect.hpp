// moe inspect: what each expert of each layer takes, over a whole split, deterministically.
//
// The split runs through evaluate_split (the windows and router noise of `moe eval`), and every
// routed slot is counted: per layer and expert its share of the slots and its mean gate weight,
// the characters it takes (and their lift: the expert's share of a character over the
// character's share of the split), its share of each character class and of each position in
// the word; across layers, how well a token's first-choice expert in layer l predicts its
// first choice in layer l + 1.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>

#include "moe/data/dataset.hpp"
#include "moe/data/tokenizer.hpp"
#include "moe/model/model.hpp"

namespace moe {

struct InspectOptions {
  int64_t batch_size = 0;  // windows per forward (0: the training batch size)
  int64_t top_chars = 8;   // characters listed per expert, by lift
  int64_t min_count = 20;  // a character needs this many occurrences in the split to be listed
};

// The character classes and word positions reported, in the order of the JSON arrays.
constexpr const char* kCharClasses[] = {"lowercase", "uppercase", "vowel", "space", "newline", "punctuation", "digit"};
constexpr const char* kWordPositions[] = {"first", "middle", "last", "single", "outside"};

// The figures above as JSON (see docs in README "Inspect and dashboard"): {"tokens", "loss",
// "vocab", "corpus", "layers": [{"experts": [...]}], "transitions": [...]}.
nlohmann::json inspect_split(Model& model, const Tokenizer& tokenizer, TokenSpan ids, const InspectOptions& opt);

// A few lines per layer for the terminal.
std::string inspect_summary(const nlohmann::json& report);

}  // namespace moe
