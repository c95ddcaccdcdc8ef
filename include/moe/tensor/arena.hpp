// Arena: a bump allocator for per-step activations, gradients and backward closures.
//
// reset() forgets every allocation but keeps the memory, so after the first training step
// (or the first few, when tokens-per-expert vary) a step allocates nothing from the system.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe {

class Arena {
 public:
  explicit Arena(size_t chunk_bytes = size_t(1) << 22) : chunk_bytes_(chunk_bytes) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Uninitialised, aligned to `align` (a power of two, at most 64).
  void* alloc_bytes(size_t bytes, size_t align = 64);
  float* alloc_floats(int64_t n) { return static_cast<float*>(alloc_bytes(sizeof(float) * size_t(n))); }
  int32_t* alloc_ints(int64_t n) { return static_cast<int32_t*>(alloc_bytes(sizeof(int32_t) * size_t(n))); }
  // n value-initialised objects; their type must need no destructor (the arena only forgets).
  template <class T>
  T* alloc_objects(int64_t n) {
    static_assert(std::is_trivially_destructible_v<T>, "the arena never runs destructors");
    static_assert(alignof(T) <= 64, "the arena aligns to at most 64 bytes");
    T* p = static_cast<T*>(alloc_bytes(sizeof(T) * size_t(n)));
    std::uninitialized_value_construct_n(p, n);
    return p;
  }

  // A copy of v in the arena (T must need no destructor: the arena only forgets).
  template <class T>
  std::decay_t<T>* copy_of(T&& v) {
    using U = std::decay_t<T>;
    static_assert(std::is_trivially_destructible_v<U>, "the arena never runs destructors");
    return new (alloc_bytes(sizeof(U), alignof(U) > 64 ? 64 : alignof(U))) U(std::forward<T>(v));
  }

  // Forget all allocations; keep the chunks for reuse.
  void reset();
  // A point in the allocations, and forgetting every allocation made after it.
  struct Mark {
    size_t chunk = 0, used = 0;
  };
  Mark mark() const { return {current_, current_ < chunks_.size() ? chunks_[current_].used : 0}; }
  void rewind(const Mark& m);
  // Zeroes, in parallel, every byte handed out since the last reset (zero_used), or every byte
  // before a mark taken earlier (zero_to: the chunks before its chunk whole).
  void zero_used();
  void zero_to(const Mark& m);
  // Forgets every allocation and gives the chunks' pages back to the system, keeping the
  // chunks: a page is resident again (zeroed) once something writes to it. Between phases that
  // lay their allocations out differently (training steps and evaluations), so that the peak
  // is the larger of the two, not their union.
  void release();
  size_t bytes_reserved() const;  // total size of the chunks held
  // How much of the chunks is resident (pages the process has touched and holds; mincore),
  // which is what counts towards its memory: never-touched room is not. Linux; elsewhere the
  // bytes reserved.
  size_t bytes_resident() const;
  size_t bytes_used() const;      // bytes handed out since the last reset

 private:
  struct Chunk {
    std::unique_ptr<std::byte[]> mem;
    size_t size = 0;
    size_t used = 0;
  };
  std::vector<Chunk> chunks_;
  size_t current_ = 0;  // index of the chunk being filled
  size_t chunk_bytes_;
};

}  // namespace moe
