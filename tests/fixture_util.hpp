// Reading the golden fixtures (tests/fixtures/*.safetensors) into vectors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/io/safetensors.hpp"

namespace moe_test {

// An F32 tensor of exactly shape s.
inline std::vector<float> read_f32(const moe::SafeTensorsFile& f, const std::string& name, const moe::Shape& s) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  f.copy_f32(name, s, v.data());
  return v;
}

// An I32 tensor of n elements.
inline std::vector<int32_t> read_i32(const moe::SafeTensorsFile& f, const std::string& name, int64_t n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  f.copy_i32(name, v.data(), n);
  return v;
}

}  // namespace moe_test
