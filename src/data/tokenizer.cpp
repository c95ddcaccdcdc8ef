#include "moe/data/tokenizer.hpp"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace moe {

std::vector<uint32_t> utf8_decode(const std::string& text) {
  std::vector<uint32_t> out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  auto fail = [&](const char* why) {
    throw std::runtime_error("invalid UTF-8 at byte offset " + std::to_string(i) + ": " + why);
  };
  while (i < n) {
    const unsigned char c = s[i];
    uint32_t cp;
    size_t len;
    if (c < 0x80) cp = c, len = 1;
    else if ((c & 0xE0) == 0xC0) cp = c & 0x1F, len = 2;
    else if ((c & 0xF0) == 0xE0) cp = c & 0x0F, len = 3;
    else if ((c & 0xF8) == 0xF0) cp = c & 0x07, len = 4;
    else fail("not a valid lead byte");
    if (i + len > n) fail("truncated multi-byte sequence");
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) fail("missing continuation byte");
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    static const uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for_len[len]) fail("overlong encoding");
    if (cp >= 0xD800 && cp <= 0xDFFF) fail("UTF-16 surrogate");
    if (cp > 0x10FFFF) fail("code point beyond U+10FFFF");
    out.push_back(cp);
    i += len;
  }
  return out;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

Tokenizer Tokenizer::from_text(const std::string& utf8) {
  std::vector<uint32_t> cps = utf8_decode(utf8);
  std::sort(cps.begin(), cps.end());
  cps.erase(std::unique(cps.begin(), cps.end()), cps.end());
  Tokenizer t;
  t.vocab_ = std::move(cps);
  return t;
}

Tokenizer Tokenizer::from_vocab(const std::vector<uint32_t>& vocab) {
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (vocab[i] > 0x10FFFF || (vocab[i] >= 0xD800 && vocab[i] <= 0xDFFF))
      throw std::runtime_error("vocabulary entry " + std::to_string(i) + " is not a Unicode scalar value");
    if (i > 0 && vocab[i] <= vocab[i - 1])
      throw std::runtime_error("vocabulary is not sorted and distinct at entry " + std::to_string(i));
  }
  Tokenizer t;
  t.vocab_ = vocab;
  return t;
}

std::vector<int32_t> Tokenizer::encode_code_points(const std::vector<uint32_t>& cps) const {
  std::vector<int32_t> ids;
  ids.reserve(cps.size());
  std::vector<uint32_t> missing;
  for (uint32_t cp : cps) {
    auto it = std::lower_bound(vocab_.begin(), vocab_.end(), cp);
    if (it == vocab_.end() || *it != cp) {
      if (std::find(missing.begin(), missing.end(), cp) == missing.end()) missing.push_back(cp);
      continue;
    }
    ids.push_back(int32_t(it - vocab_.begin()));
  }
  if (!missing.empty()) {
    std::string msg = std::to_string(missing.size()) + " character(s) not in the model's vocabulary:";
    for (uint32_t cp : missing) {
      char hex[16];
      std::snprintf(hex, sizeof hex, "U+%04X", cp);
      std::string ch;
      if (cp >= 0x20 && cp != 0x7F) utf8_append(ch, cp);
      msg += " '" + ch + "' (" + hex + ")";
    }
    throw std::runtime_error(msg);
  }
  return ids;
}

std::vector<int32_t> Tokenizer::encode(const std::string& utf8) const { return encode_code_points(utf8_decode(utf8)); }

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= int32_t(vocab_.size()))
      throw std::runtime_error("token id " + std::to_string(id) + " outside the vocabulary of " +
                               std::to_string(vocab_.size()));
    utf8_append(out, vocab_[size_t(id)]);
  }
  return out;
}

}  // namespace moe
