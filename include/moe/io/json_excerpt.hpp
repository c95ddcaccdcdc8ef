// json_excerpt: a JSON value as error messages quote it. nlohmann's dump() recurses once per
// nesting level, so quoting a value from an untrusted file (a config, a safetensors header)
// with dump() overflows the stack on [[[[...]]]] tens of thousands deep; this quotes such
// values by type and depth instead, and cuts long dumps.
#pragma once

#include <cstddef>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace moe {

// j.dump() when j is nested at most 64 levels deep (cut to about max_chars, then "..."),
// else e.g. "an array nested over 64 levels deep".
std::string json_excerpt(const nlohmann::json& j, size_t max_chars = 200);

}  // namespace moe
