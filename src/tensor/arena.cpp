#include "moe/tensor/arena.hpp"

#include <algorithm>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace moe {

void* Arena::alloc_bytes(size_t bytes, size_t align) {
  if (align < 1) align = 1;
  for (; current_ < chunks_.size(); ++current_) {
    Chunk& c = chunks_[current_];
    auto base = reinterpret_cast<uintptr_t>(c.mem.get());
    size_t start = ((base + c.used + align - 1) & ~(uintptr_t(align) - 1)) - base;
    if (start + bytes <= c.size) {
      c.used = start + bytes;
      return c.mem.get() + start;
    }
  }
  // No room in any held chunk: add one big enough (64 bytes of slack for alignment).
  Chunk c;
  c.size = std::max(chunk_bytes_, bytes + 64);
  c.mem.reset(new std::byte[c.size]);
  chunks_.push_back(std::move(c));
  current_ = chunks_.size() - 1;
  return alloc_bytes(bytes, align);
}

void Arena::zero_used() { zero_to(mark()); }

void Arena::zero_to(const Mark& m) {
  constexpr size_t kBlock = size_t(1) << 16;  // bytes a task zeroes
  for (size_t i = 0; i <= m.chunk && i < chunks_.size(); ++i) {
    std::byte* mem = chunks_[i].mem.get();
    // Chunks before the mark whole: how far they are used now may differ from then.
    const size_t used = i == m.chunk ? m.used : chunks_[i].size;
    const auto blocks = int64_t((used + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static) if (blocks > 4)
    for (int64_t b = 0; b < blocks; ++b)
      std::memset(mem + size_t(b) * kBlock, 0, std::min(kBlock, used - size_t(b) * kBlock));
  }
}

void Arena::reset() {
  for (Chunk& c : chunks_) c.used = 0;
  current_ = 0;
}

void Arena::rewind(const Mark& m) {
  for (size_t i = m.chunk; i < chunks_.size(); ++i) chunks_[i].used = i == m.chunk ? m.used : 0;
  current_ = m.chunk;
}

void Arena::release() {
  reset();
#ifdef __linux__
  const auto page = uintptr_t(sysconf(_SC_PAGESIZE));
  for (Chunk& c : chunks_) {
    // The whole pages inside the chunk.
    const auto base = reinterpret_cast<uintptr_t>(c.mem.get());
    const uintptr_t first = (base + page - 1) & ~(page - 1), end = (base + c.size) & ~(page - 1);
    if (end > first) madvise(reinterpret_cast<void*>(first), end - first, MADV_DONTNEED);
  }
#endif
}

size_t Arena::bytes_reserved() const {
  size_t n = 0;
  for (const Chunk& c : chunks_) n += c.size;
  return n;
}

size_t Arena::bytes_resident() const {
#ifdef __linux__
  const auto page = uintptr_t(sysconf(_SC_PAGESIZE));
  size_t n = 0;
  std::vector<unsigned char> in;
  for (const Chunk& c : chunks_) {
    const auto base = reinterpret_cast<uintptr_t>(c.mem.get());
    const uintptr_t first = base & ~(page - 1), end = (base + c.size + page - 1) & ~(page - 1);
    in.resize((end - first) / page);
    if (mincore(reinterpret_cast<void*>(first), end - first, in.data()) != 0) return bytes_reserved();
    for (size_t i = 0; i < in.size(); ++i)
      if (in[i] & 1u) n += std::min(base + c.size, first + (i + 1) * page) - std::max(base, first + i * page);
  }
  return n;
#else
  return bytes_reserved();
#endif
}

size_t Arena::bytes_used() const {
  size_t n = 0;
  for (const Chunk& c : chunks_) n += c.used;
  return n;
}

}  // namespace moe
