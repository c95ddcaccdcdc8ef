#include "moe/io/safetensors.hpp"
#include "moe/io/json_excerpt.hpp"
#include "moe/testing/fault_injection.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace moe {

namespace {

struct DTypeInfo {
  DType d;
  const char* name;
  size_t size;
};
constexpr uint64_t kFnvOffset = 14695981039346656037ull;  // 0xcbf29ce484222325, the FNV-1a-64 basis
// Files written before the basis was corrected (it had lost its last digit) hold a checksum
// with this basis; they are still accepted.
constexpr uint64_t kLegacyFnvOffset = 1469598103934665603ull;
constexpr const char* kChecksumKey = "checksum_fnv1a64";
constexpr uint64_t kMaxHeader = uint64_t(100) << 20;  // the reference implementation's limit

constexpr DTypeInfo kDTypes[] = {{DType::F32, "F32", 4}, {DType::I32, "I32", 4}, {DType::I64, "I64", 8}, {DType::U8, "U8", 1}};

std::runtime_error io_error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)v);
  return buf;
}

// Writes all of buf to fd, retrying short writes.
bool write_all(int fd, const void* buf, size_t n) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= size_t(w);
  }
  return true;
}

// The integers of a JSON array. nlohmann's get<integer>() also takes floats and converts them
// with a cast that is undefined behaviour when out of range (data_offsets [0, 85e52]), so
// only JSON integers are accepted; `non_negative` also refuses negative ones.
template <class T>
std::vector<T> int_array(const nlohmann::json& j, bool non_negative, const std::string& path, const std::string& what) {
  bool ok = j.is_array();
  for (size_t i = 0; ok && i < j.size(); ++i) ok = non_negative ? j[i].is_number_unsigned() : j[i].is_number_integer();
  if (!ok)
    throw io_error(path, what + " must be an array of " + (non_negative ? "non-negative " : "") + "integers, got " + json_excerpt(j));
  std::vector<T> out;
  for (const auto& e : j) out.push_back(e.get<T>());
  return out;
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& t : kDTypes)
    if (t.d == d) return t.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& t : kDTypes)
    if (t.d == d) return t.size;
  return 0;
}

uint64_t fnv1a64_update(uint64_t h, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t fnv1a64(const uint8_t* p, size_t n) { return fnv1a64_update(kFnvOffset, p, n); }

void save_safetensors(const std::string& path, const std::vector<TensorEntry>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  size_t offset = 0;
  for (const TensorEntry& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      throw io_error(path, "cannot write a tensor named '" + t.name + "' (empty and __metadata__ are reserved)");
    if (header.contains(t.name)) throw io_error(path, "cannot write tensor " + t.name + " twice");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw io_error(path, "tensor " + t.name + " has a negative dimension " + std::to_string(d));
      numel *= uint64_t(d);
    }
    if (numel * dtype_size(t.dtype) != t.nbytes)
      throw io_error(path, "tensor " + t.name + ": shape gives " + std::to_string(numel * dtype_size(t.dtype)) +
                               " bytes of " + dtype_name(t.dtype) + " but " + std::to_string(t.nbytes) + " were given");
    if (t.nbytes > 0 && t.data == nullptr) throw io_error(path, "tensor " + t.name + " has no data pointer");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  uint64_t h = kFnvOffset;
  for (const TensorEntry& t : tensors) h = fnv1a64_update(h, static_cast<const uint8_t*>(t.data), t.nbytes);
  nlohmann::ordered_json meta(metadata);
  meta[kChecksumKey] = hex64(h);
  header["__metadata__"] = meta;
  std::string hs = header.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  const uint64_t hlen = hs.size();
  uint8_t lenbytes[8];
  for (int i = 0; i < 8; ++i) lenbytes[i] = uint8_t(hlen >> (8 * i));

  // Write a sibling temporary, make it durable, then rename it over the target: a reader (or
  // a crash) sees either the old file or the new one, never a torn one.
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw io_error(path, "cannot create the temporary file " + tmp + ": " + std::strerror(errno) +
                             " (does the directory exist and is it writable?); the previous file, if any, is untouched");
  int err = 0;
  const char* step = nullptr;
  auto fail = [&](const char* what) {
    if (!step) step = what, err = errno;
  };
  if (!write_all(fd, lenbytes, 8) || !write_all(fd, hs.data(), hs.size())) fail("write");
  for (const TensorEntry& t : tensors) {
    if (!step && !write_all(fd, t.data, t.nbytes)) fail("write");
    testing::FaultInjection::after_tensor_write();
  }
  if (!step && ::fsync(fd) != 0) fail("fsync");
  if (::close(fd) != 0) fail("close");
  if (!step && std::rename(tmp.c_str(), path.c_str()) != 0) fail("rename");
  if (step) {
    std::remove(tmp.c_str());
    throw io_error(path, std::string("writing failed at ") + step + " (" + std::strerror(err) +
                             "); the previous file, if any, is untouched");
  }
  // Make the rename itself durable.
  const std::string dir = std::filesystem::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

SafeTensorsFile load_safetensors(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw io_error(path, "is a directory, not a safetensors file");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw io_error(path, "cannot open (does the checkpoint exist?)");
  const auto size = uint64_t(in.tellg());
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!in) throw io_error(path, "read failed");
  return parse_safetensors(std::move(bytes), path);
}

namespace {

// The header length from the file's first 8 bytes, checked against the file's size.
uint64_t header_length(const uint8_t* first8, uint64_t size, const std::string& path) {
  if (size < 8) throw io_error(path, "too short (" + std::to_string(size) + " bytes) to be a safetensors file");
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t(first8[i]) << (8 * i);
  if (hlen > size - 8)
    throw io_error(path, "header length " + std::to_string(hlen) + " exceeds the file (" + std::to_string(size) +
                             " bytes): truncated or not a safetensors file");
  if (hlen > kMaxHeader)
    throw io_error(path, "header length " + std::to_string(hlen) + " is over the 100 MiB limit: not a safetensors file?");
  return hlen;
}

// Whether the metadata's checksum (if any) is that of the data section, given its FNV-1a-64
// hash h; `legacy` computes the hash with the legacy basis, asked only when h does not match.
template <class Legacy>
void check_checksum(const std::map<std::string, std::string>& meta, uint64_t h, Legacy legacy, const std::string& path) {
  // Files from other writers (e.g. Python's safetensors) carry no checksum: then there is none to check.
  auto it = meta.find(kChecksumKey);
  if (it == meta.end()) return;
  const std::string actual = hex64(h);
  if (it->second != actual && it->second != hex64(legacy()))
    throw io_error(path, "checksum mismatch (stored " + it->second + ", data " + actual + "): the tensor data is corrupted");
}

// Reads n bytes at offset into buf, retrying short reads; throws naming the path.
void read_at(int fd, void* buf, size_t n, uint64_t offset, const std::string& path) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw io_error(path, std::string("read failed") + (r < 0 ? std::string(": ") + std::strerror(errno) : " (the file is shorter than its header says: truncated?)"));
    p += r, offset += uint64_t(r), n -= size_t(r);
  }
}

struct Fd {
  int fd;
  ~Fd() { ::close(fd); }
};

}  // namespace

SafeTensorsFile parse_safetensors(std::vector<uint8_t> bytes, const std::string& path) {
  const uint64_t hlen = header_length(bytes.data(), bytes.size(), path);
  const std::string hs(reinterpret_cast<const char*>(bytes.data()) + 8, size_t(hlen));
  // The data section is what follows the header; drop the prefix in place (no second copy of the file).
  bytes.erase(bytes.begin(), bytes.begin() + std::ptrdiff_t(8 + hlen));
  SafeTensorsFile f = SafeTensorsFile::parse_header(hs, bytes.size(), path);
  f.data_ = std::move(bytes);
  f.in_memory_ = true;
  check_checksum(f.metadata_, fnv1a64(f.data_.data(), f.data_.size()),
                 [&] { return fnv1a64_update(kLegacyFnvOffset, f.data_.data(), f.data_.size()); }, path);
  return f;
}

SafeTensorsFile read_safetensors_header(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw io_error(path, "is a directory, not a safetensors file");
  const Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw io_error(path, "cannot open (does the checkpoint exist?)");
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw io_error(path, std::string("cannot stat: ") + std::strerror(errno));
  const auto size = uint64_t(st.st_size);
  uint8_t first8[8] = {};
  if (size >= 8) read_at(f.fd, first8, 8, 0, path);
  const uint64_t hlen = header_length(first8, size, path);
  std::string hs(size_t(hlen), '\0');
  read_at(f.fd, hs.data(), hs.size(), 8, path);
  SafeTensorsFile file = SafeTensorsFile::parse_header(hs, size - 8 - hlen, path);
  file.data_offset_ = 8 + hlen;
  return file;
}

SafeTensorsFile SafeTensorsFile::parse_header(const std::string& hs, uint64_t data_size, const std::string& path) {
  SafeTensorsFile f;
  f.path_ = path;
  f.data_size_ = data_size;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hs);
  } catch (const nlohmann::json::exception& e) {
    throw io_error(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw io_error(path, "header is not a JSON object");
  struct Range {
    size_t begin, end;
    std::string name;
    bool operator<(const Range& o) const { return begin != o.begin ? begin < o.begin : end < o.end; }
  };
  std::vector<Range> ranges;
  try {
    for (auto& [name, v] : header.items()) {
      if (name == "__metadata__") {
        if (!v.is_object()) throw io_error(path, "__metadata__ must be an object of strings, got " + json_excerpt(v));
        for (auto& [k, s] : v.items()) {
          if (!s.is_string()) throw io_error(path, "metadata " + k + " must be a string, got " + json_excerpt(s));
          f.metadata_[k] = s.get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) throw io_error(path, "tensor " + name + ": header entry must be an object, got " + json_excerpt(v));
      SafeTensorsFile::Info info{};
      const std::string dt = v.at("dtype").get<std::string>();
      bool known = false;
      for (const auto& t : kDTypes)
        if (dt == t.name) info.dtype = t.d, known = true;
      if (!known) throw io_error(path, "tensor " + name + " has unsupported dtype " + dt + " (this reader knows F32, I32, I64, U8)");
      info.shape = int_array<int64_t>(v.at("shape"), false, path, "tensor " + name + ": shape");
      const auto off = int_array<uint64_t>(v.at("data_offsets"), true, path, "tensor " + name + ": data_offsets");
      if (off.size() != 2 || off[0] > off[1])
        throw io_error(path, "tensor " + name + " has malformed data_offsets " + json_excerpt(v.at("data_offsets")));
      if (off[1] > data_size)
        throw io_error(path, "tensor " + name + " has data offsets [" + std::to_string(off[0]) + ", " +
                                 std::to_string(off[1]) + ") outside the file's " + std::to_string(data_size) +
                                 "-byte data section (truncated?)");
      uint64_t numel = 1;
      for (int64_t d : info.shape) {
        if (d < 0) throw io_error(path, "tensor " + name + " has a negative dimension");
        // Any dimension past the data section's size cannot match; stop before numel overflows.
        if (d > 0 && numel > data_size / uint64_t(d))
          throw io_error(path, "tensor " + name + ": shape " + json_excerpt(v.at("shape")) + " is larger than the file");
        numel *= uint64_t(d);
      }
      if (numel * dtype_size(info.dtype) != off[1] - off[0])
        throw io_error(path, "tensor " + name + ": shape " + json_excerpt(v.at("shape")) + " of " + dt + " needs " +
                                 std::to_string(numel * dtype_size(info.dtype)) + " bytes, data_offsets give " +
                                 std::to_string(off[1] - off[0]));
      info.begin = size_t(off[0]);
      info.end = size_t(off[1]);
      ranges.push_back({info.begin, info.end, name});
      f.infos_[name] = info;
    }
  } catch (const nlohmann::json::exception& e) {
    throw io_error(path, std::string("malformed header: ") + e.what());
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].begin < ranges[i - 1].end)
      throw io_error(path, "tensors " + ranges[i - 1].name + " and " + ranges[i].name + " overlap in the data section");
  return f;
}

std::vector<std::string> SafeTensorsFile::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : infos_) n.push_back(k);
  return n;
}

const SafeTensorsFile::Info& SafeTensorsFile::info(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) throw io_error(path_, "has no tensor '" + name + "'");
  return it->second;
}

const uint8_t* SafeTensorsFile::bytes(const std::string& name) const {
  const Info& i = info(name);
  if (!in_memory_) throw io_error(path_, "tensor " + name + ": only the header was read");
  return data_.data() + i.begin;
}

const SafeTensorsFile::Info& SafeTensorsFile::f32_info(const std::string& name, const Shape& expected) const {
  const Info& i = info(name);
  if (i.dtype != DType::F32) throw io_error(path_, "tensor " + name + " is " + dtype_name(i.dtype) + ", expected F32");
  bool same = int(i.shape.size()) == expected.ndim;
  for (int d = 0; same && d < expected.ndim; ++d) same = i.shape[size_t(d)] == expected[d];
  if (!same) {
    std::string s = "[";
    for (size_t d = 0; d < i.shape.size(); ++d) s += (d ? ", " : "") + std::to_string(i.shape[d]);
    throw io_error(path_, "tensor " + name + " has shape " + s + "], the model expects " + expected.str() +
                              " (checkpoint from another config?)");
  }
  return i;
}

void SafeTensorsFile::copy_f32(const std::string& name, const Shape& expected, float* out) const {
  const Info& i = f32_info(name, expected);
  if (!in_memory_) throw io_error(path_, "tensor " + name + ": only the header was read");
  std::memcpy(out, data_.data() + i.begin, i.end - i.begin);
}

void SafeTensorsFile::read_f32(const std::vector<F32Dest>& wanted, bool check) const {
  struct Part {
    size_t begin, end;
    float* out;
  };
  std::vector<Part> parts;
  for (const F32Dest& d : wanted) {
    const Info& i = f32_info(d.name, d.shape);
    parts.push_back({i.begin, i.end, d.out});
  }
  if (in_memory_) {
    for (const Part& p : parts) std::memcpy(p.out, data_.data() + p.begin, p.end - p.begin);
    return;
  }
  // One pass over the data section in file order: each wanted tensor read into its place, the
  // bytes between them through a small buffer, all of it into the checksum.
  std::sort(parts.begin(), parts.end(), [](const Part& a, const Part& b) { return a.begin < b.begin; });
  const Fd f{::open(path_.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw io_error(path_, std::string("cannot open: ") + std::strerror(errno));
  const bool checked = check && metadata_.count(kChecksumKey) > 0;
  std::vector<uint8_t> buf(checked ? size_t(1) << 20 : 0);
  uint64_t h = kFnvOffset;
  const auto skip = [&](uint64_t from, uint64_t to) {  // only hashed
    for (uint64_t at = from; at < to;) {
      const size_t n = size_t(std::min<uint64_t>(buf.size(), to - at));
      read_at(f.fd, buf.data(), n, data_offset_ + at, path_);
      h = fnv1a64_update(h, buf.data(), n);
      at += n;
    }
  };
  uint64_t pos = 0;
  for (const Part& p : parts) {
    if (p.begin < pos) throw io_error(path_, "read_f32: a tensor asked for twice");
    if (checked) skip(pos, p.begin);
    read_at(f.fd, p.out, p.end - p.begin, data_offset_ + p.begin, path_);
    if (checked) h = fnv1a64_update(h, reinterpret_cast<const uint8_t*>(p.out), p.end - p.begin);
    pos = p.end;
  }
  if (!checked) return;
  skip(pos, data_size_);
  check_checksum(metadata_, h, [&] {  // a second pass, for files written with the legacy basis
    h = kLegacyFnvOffset;
    skip(0, data_size_);
    return h;
  }, path_);
}

void SafeTensorsFile::verify_checksum() const {
  if (in_memory_ || metadata_.count(kChecksumKey) == 0) return;  // in memory: checked when loaded
  read_f32({});
}

void SafeTensorsFile::copy_i32(const std::string& name, int32_t* out, int64_t n) const {
  const Info& i = info(name);
  if (i.dtype != DType::I32 || (i.end - i.begin) != size_t(n) * 4)
    throw io_error(path_, "tensor " + name + " is not I32 with " + std::to_string(n) + " elements");
  if (!in_memory_) throw io_error(path_, "tensor " + name + ": only the header was read");
  std::memcpy(out, data_.data() + i.begin, i.end - i.begin);
}

}  // namespace moe
