// libFuzzer target: config text -> parse_config (JSON parse, field table, validation), then
// the derived sizes and a serialise/parse round trip. ConfigError (or any std::exception) is
// the expected answer to bad input; crashes, sanitizer reports and hangs are findings.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>

#include "moe/io/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::Config c;
  try {
    c = moe::parse_config(text, "fuzz.json");
  } catch (const std::exception&) {
    return 0;
  }
  // A config that loaded must serialise, and load again to the same values.
  (void)c.head_size();
  (void)c.expert_hidden_size();
  (void)c.attention_scale();
  const std::string dumped = moe::config_to_json(c).dump();
  const moe::Config again = moe::parse_config(dumped, "round trip");  // throwing here is a finding
  if (moe::config_to_json(again) != moe::config_to_json(c)) std::abort();
  return 0;
}
