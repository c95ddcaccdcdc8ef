// The run directory of moe train (logging.out_dir, or --out): one run writes it at a time,
// a fresh run empties it of an earlier run's checkpoints only when told to, and
// last.safetensors is replaced atomically.
#pragma once

#include <filesystem>

namespace moe {

// An exclusive lock on a run directory, held from construction to destruction: flock on
// <dir>/run.lock, which holds the holder's process id while it runs. The kernel releases the
// lock when its file descriptor closes, however the process ends (an error, a signal,
// kill -9), so a lock file left behind by a dead process blocks nobody.
class RunDirLock {
 public:
  // Creates the directory when it is missing. When another process holds the lock, throws
  // naming that process's id, having changed nothing in the directory.
  explicit RunDirLock(const std::filesystem::path& dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  int fd_ = -1;
};

// The lock file of a run directory.
std::filesystem::path run_lock_path(const std::filesystem::path& dir);

// A fresh run must not silently mix with, or overwrite, another run's checkpoints: throws,
// naming what would fix it, when `out` holds checkpoints and overwrite is false; otherwise
// deletes its checkpoints and metrics.jsonl. Call it holding the directory's RunDirLock.
void prepare_fresh_run_dir(const std::filesystem::path& out, bool overwrite);

// Makes `to` name the same bytes as `from`, atomically: a hard link (or, where the file system
// has none, a copy) to a temporary name, then a rename over `to`.
void link_atomically(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace moe
