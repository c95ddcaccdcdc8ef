// The safetensors format: an 8-byte little-endian header length N, N bytes of JSON header
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// padded with spaces to a multiple of 8), then the raw little-endian tensor bytes.
//
// save_safetensors writes atomically (temporary file, fsync, rename, fsync of the directory)
// and stores an FNV-1a-64 checksum of the data section in the metadata; load_safetensors
// validates every offset and the checksum (when present) and names the path in every error.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moe/tensor/tensor.hpp"

namespace moe {

enum class DType { F32, I32, I64, U8 };
const char* dtype_name(DType d);
size_t dtype_size(DType d);

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Throws std::runtime_error naming the path (and the errno text for I/O failures); a failed
// write removes its temporary and leaves any previous file at `path` as it was.
void save_safetensors(const std::string& path, const std::vector<TensorEntry>& tensors,
                      const std::map<std::string, std::string>& metadata);

class SafeTensorsFile {
 public:
  struct Info {
    DType dtype;
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // within the data section
  };

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return infos_.count(name) > 0; }
  const Info& info(const std::string& name) const;  // throws naming a missing tensor
  // Whether the tensors were read (load_safetensors), or only the header (read_safetensors_header).
  bool in_memory() const { return in_memory_; }
  const uint8_t* bytes(const std::string& name) const;  // in memory only
  // Copies an F32 tensor, checking it has exactly `expected` shape (in memory only).
  void copy_f32(const std::string& name, const Shape& expected, float* out) const;
  // Copies an I32 tensor of n elements (any shape; in memory only).
  void copy_i32(const std::string& name, int32_t* out, int64_t n) const;
  // Copies the F32 tensors named, each checked as copy_f32 checks it. For a file of which only
  // the header was read, from the file in one pass over its data section, which also goes
  // through the checksum (checked as load_safetensors checks it, after the copies): only the
  // tensors asked for take memory.
  struct F32Dest {
    std::string name;
    Shape shape;
    float* out;
  };
  // check = false: only the tensors asked for are read, without the checksum; the caller
  // checks it with verify_checksum (moe generate does, on a thread of its own).
  void read_f32(const std::vector<F32Dest>& wanted, bool check = true) const;
  // Checks the checksum as read_f32 does, from the file (one pass over its data section
  // through a small buffer; the memory read into is not touched). For a file only the
  // header of which was read; throws the same errors.
  void verify_checksum() const;

 private:
  friend SafeTensorsFile parse_safetensors(std::vector<uint8_t> bytes, const std::string& path);
  friend SafeTensorsFile read_safetensors_header(const std::string& path);
  // The entries and metadata of the JSON header hs, validated against a data section of
  // data_size bytes.
  static SafeTensorsFile parse_header(const std::string& hs, uint64_t data_size, const std::string& path);
  const Info& f32_info(const std::string& name, const Shape& expected) const;
  std::string path_;
  std::vector<uint8_t> data_;  // the data section, when in memory
  bool in_memory_ = false;
  uint64_t data_offset_ = 0, data_size_ = 0;  // where the data section is in the file, its bytes
  std::map<std::string, Info> infos_;
  std::map<std::string, std::string> metadata_;
};

// Reads the whole file and validates it; throws std::runtime_error naming the path and the problem.
SafeTensorsFile load_safetensors(const std::string& path);
// Reads and validates the header only (the checksum is checked by read_f32, which reads the data).
SafeTensorsFile read_safetensors_header(const std::string& path);
// The same from the file's bytes in memory; `path` names the source in every error.
SafeTensorsFile parse_safetensors(std::vector<uint8_t> bytes, const std::string& path);

// FNV-1a 64-bit hash; the checksum stored in metadata "checksum_fnv1a64" as 16 hex digits.
uint64_t fnv1a64(const uint8_t* p, size_t n);
uint64_t fnv1a64_update(uint64_t h, const uint8_t* p, size_t n);

}  // namespace moe
