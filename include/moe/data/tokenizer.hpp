// Character tokenizer over Unicode code points of UTF-8 text: the vocabulary is the sorted
// set of distinct code points, and a character's id is its rank.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

// Decodes UTF-8 into code points; throws std::runtime_error naming the byte offset of the
// first invalid sequence (bad lead byte, truncation, overlong form, surrogate, > U+10FFFF).
std::vector<uint32_t> utf8_decode(const std::string& text);
void utf8_append(std::string& out, uint32_t cp);

class Tokenizer {
 public:
  Tokenizer() = default;
  static Tokenizer from_text(const std::string& utf8);
  // From a saved vocabulary (sorted, distinct code points).
  static Tokenizer from_vocab(const std::vector<uint32_t>& vocab);

  // Throws naming every character missing from the vocabulary.
  std::vector<int32_t> encode(const std::string& utf8) const;
  std::vector<int32_t> encode_code_points(const std::vector<uint32_t>& cps) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::vector<uint32_t>& vocab() const { return vocab_; }
  int64_t size() const { return int64_t(vocab_.size()); }

 private:
  std::vector<uint32_t> vocab_;
};

}  // namespace moe
