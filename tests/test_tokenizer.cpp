// Character tokenizer over Unicode code points, and the strict UTF-8 decoder under it.
#include <catch2/catch.hpp>

#include <algorithm>

#include "moe/data/tokenizer.hpp"

using namespace moe;
using Catch::Contains;

TEST_CASE("Tokenizer: sorted code-point vocabulary, UTF-8 round trip", "[io][tokenizer]") {
  const std::string text = "héllo wörld — ✓ 日本";
  const Tokenizer t = Tokenizer::from_text(text);
  // Distinct code points: h é l o ' ' w ö r d — ✓ 日 本
  const std::vector<uint32_t> expected = {' ', 'd', 'h', 'l', 'o', 'r', 'w', 0xE9, 0xF6, 0x2014, 0x2713, 0x65E5, 0x672C};
  CHECK(t.vocab() == expected);
  CHECK(t.size() == 13);
  const std::vector<int32_t> ids = t.encode(text);
  CHECK(ids.size() == 18);  // code points, not bytes
  CHECK(ids[0] == 2);       // 'h' has rank 2
  CHECK(ids[1] == 7);       // 'é'
  CHECK(t.decode(ids) == text);
  CHECK(t.decode(t.encode("日本 — wörld")) == "日本 — wörld");

  const std::string emoji = "a🙂b\n";  // a 4-byte sequence
  const Tokenizer te = Tokenizer::from_text(emoji);
  CHECK(te.vocab() == std::vector<uint32_t>{'\n', 'a', 'b', 0x1F642});
  CHECK(te.decode(te.encode(emoji)) == emoji);

  // A saved vocabulary rebuilds the same tokenizer.
  const Tokenizer again = Tokenizer::from_vocab(t.vocab());
  CHECK(again.encode(text) == ids);
  CHECK_THROWS_WITH(Tokenizer::from_vocab({'b', 'a'}), Contains("not sorted and distinct at entry 1"));
  CHECK_THROWS_WITH(Tokenizer::from_vocab({'a', 0xD800}), Contains("entry 1 is not a Unicode scalar value"));
  CHECK_THROWS_WITH(t.decode({0, 13}), Contains("token id 13 outside the vocabulary of 13"));
  CHECK(Tokenizer::from_text("").size() == 0);
}

TEST_CASE("Tokenizer: encode names every missing character and its code point", "[io][tokenizer]") {
  const Tokenizer t = Tokenizer::from_text("héllo wörld — ✓ 日本");
  CHECK_THROWS_WITH(t.encode("hé!Z!"), Contains("2 character(s) not in the model's vocabulary") &&
                                          Contains("'!' (U+0021)") && Contains("'Z' (U+005A)"));
  CHECK_THROWS_WITH(t.encode("日本語"), Contains("'語' (U+8A9E)"));
  CHECK_THROWS_WITH(t.encode("a\tb"), Contains("(U+0009)"));  // control characters by code point only
}

TEST_CASE("UTF-8: boundary code points round-trip, invalid input names the byte offset", "[io][tokenizer]") {
  std::string s;
  const std::vector<uint32_t> cps = {0, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF};
  for (uint32_t cp : cps) utf8_append(s, cp);
  CHECK(utf8_decode(s) == cps);

  CHECK_THROWS_WITH(utf8_decode(std::string("ab\xC3", 3)), Contains("byte offset 2") && Contains("truncated"));
  CHECK_THROWS_WITH(utf8_decode("abc\xF0\x9F\x99"), Contains("byte offset 3") && Contains("truncated"));
  CHECK_THROWS_WITH(utf8_decode("a\xC0\xAF"), Contains("byte offset 1") && Contains("overlong"));      // '/' in 2 bytes
  CHECK_THROWS_WITH(utf8_decode("xy\xE0\x80\xAF"), Contains("byte offset 2") && Contains("overlong"));  // '/' in 3 bytes
  CHECK_THROWS_WITH(utf8_decode("\xF0\x80\x80\xAF"), Contains("byte offset 0") && Contains("overlong"));
  CHECK_THROWS_WITH(utf8_decode("ok\xED\xA0\x80"), Contains("byte offset 2") && Contains("surrogate"));
  CHECK_THROWS_WITH(utf8_decode("\xF4\x90\x80\x80"), Contains("byte offset 0") && Contains("beyond U+10FFFF"));
  CHECK_THROWS_WITH(utf8_decode("x\xFF"), Contains("byte offset 1") && Contains("lead byte"));
  CHECK_THROWS_WITH(utf8_decode("é\x80"), Contains("byte offset 2") && Contains("lead byte"));  // stray continuation
  CHECK_THROWS_WITH(utf8_decode("\xC3" "A"), Contains("byte offset 0") && Contains("continuation"));
  CHECK_THROWS_WITH(Tokenizer::from_text("ok\xFF"), Contains("byte offset 2"));
}
