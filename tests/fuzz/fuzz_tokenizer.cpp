// libFuzzer target: bytes as UTF-8 text -> Tokenizer::from_text, encode, decode. Valid text
// must round-trip exactly; invalid UTF-8 must be refused with a std::exception. The first
// byte also picks a split point so encode sees text from a smaller vocabulary (missing
// characters must be reported, not crash), and decode sees out-of-range ids.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "moe/data/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::Tokenizer t;
  try {
    t = moe::Tokenizer::from_text(text);
  } catch (const std::exception&) {
    return 0;  // invalid UTF-8
  }
  const std::vector<int32_t> ids = t.encode(text);  // every character is in the vocabulary: must not throw
  if (t.decode(ids) != text) std::abort();
  // The vocabulary must be sorted, distinct, and rebuild the same tokenizer.
  const moe::Tokenizer v = moe::Tokenizer::from_vocab(t.vocab());
  if (v.vocab() != t.vocab()) std::abort();
  std::string re;
  for (uint32_t cp : t.vocab()) moe::utf8_append(re, cp);
  if (moe::utf8_decode(re) != t.vocab()) std::abort();

  // Text outside a smaller vocabulary: encode must throw, not crash.
  if (size > 1) {
    const size_t cut = size_t(data[0]) % size;
    try {
      const moe::Tokenizer small = moe::Tokenizer::from_text(text.substr(0, cut));
      const std::vector<int32_t> s = small.encode(text);
      if (small.decode(s) != text) std::abort();
    } catch (const std::exception&) {
    }
  }
  // Ids outside the vocabulary must be refused.
  std::vector<int32_t> bad(ids.begin(), ids.end());
  for (size_t i = 0; i + 4 <= size && bad.size() < 64; i += 4) {
    int32_t id;
    __builtin_memcpy(&id, data + i, 4);
    bad.push_back(id);
  }
  try {
    (void)t.decode(bad);
  } catch (const std::exception&) {
  }
  return 0;
}
