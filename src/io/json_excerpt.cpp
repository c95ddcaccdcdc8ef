#include "moe/io/json_excerpt.hpp"

#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

namespace moe {

std::string json_excerpt(const nlohmann::json& j, size_t max_chars) {
  constexpr size_t kMaxDepth = 64;
  // Depth first, with an explicit stack: no recursion however deep the value is.
  std::vector<std::pair<const nlohmann::json*, size_t>> todo{{&j, 1}};
  while (!todo.empty()) {
    const auto [v, depth] = todo.back();
    todo.pop_back();
    if (depth > kMaxDepth)
      return std::string(j.is_array() ? "an array" : "an object") + " nested over " + std::to_string(kMaxDepth) +
             " levels deep";
    if (v->is_structured())
      for (const auto& child : *v) todo.push_back({&child, depth + 1});
  }
  std::string s = j.dump();
  if (s.size() > max_chars) {
    size_t cut = max_chars;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 character
    s = s.substr(0, cut) + "...";
  }
  return s;
}

}  // namespace moe
