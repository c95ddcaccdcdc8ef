#include "moe/train/run_dir.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace moe {

namespace {

// The process id written in an open lock file, or 0 when there is none yet.
long read_pid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  return n > 0 ? std::strtol(buf, nullptr, 10) : 0;
}

bool is_alive(long pid) { return pid > 0 && (::kill(pid_t(pid), 0) == 0 || errno == EPERM); }

// The holder of the lock on fd, which this process failed to take. The holder writes its id
// just after taking the lock, and empties the file when it lets go, so for a moment the file
// may be empty or still name a process killed while it held the lock: wait a little for a live
// process's id. 0 when none appears.
long lock_holder(int fd) {
  for (int tries = 0; tries < 100; ++tries) {
    const long pid = read_pid(fd);
    if (is_alive(pid)) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return 0;
}

}  // namespace

std::filesystem::path run_lock_path(const std::filesystem::path& dir) { return dir / "run.lock"; }

RunDirLock::RunDirLock(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const std::string path = run_lock_path(dir).string();
  // Opened without O_TRUNC: the file may hold the id of a process that holds the lock.
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw std::runtime_error("cannot open the run directory's lock file " + path + ": " + std::strerror(errno) +
                             " (is the directory writable?)");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    const long holder = err == EWOULDBLOCK ? lock_holder(fd_) : 0;
    ::close(fd_);
    if (err != EWOULDBLOCK)
      throw std::runtime_error("cannot lock the run directory's lock file " + path + ": " + std::strerror(err));
    throw std::runtime_error("run directory " + dir.string() + " is in use by another moe run (" +
                             (holder > 0 ? "process " + std::to_string(holder) : "a process whose id is unknown") +
                             ", which holds " + path + "); wait for it to end, stop it, or choose another --out");
  }
  const std::string pid = std::to_string(long(::getpid())) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    const int err = errno;
    ::close(fd_);
    throw std::runtime_error("cannot write the process id into " + path + ": " + std::strerror(err));
  }
}

RunDirLock::~RunDirLock() {
  // Empty, the file names no holder once this process lets go; the lock goes with the descriptor.
  const int emptied = ::ftruncate(fd_, 0);
  (void)emptied;  // a stale id is harmless: lock_holder only names a live process
  ::close(fd_);
}

void prepare_fresh_run_dir(const std::filesystem::path& out, bool overwrite) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(out)) return;
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() == ".safetensors" || name == "metrics.jsonl") old.push_back(e.path());
  }
  const bool has_checkpoints = std::any_of(old.begin(), old.end(), [](const fs::path& p) {
    return p.extension() == ".safetensors";
  });
  if (has_checkpoints && !overwrite)
    throw std::runtime_error("run directory " + out.string() +
                             " already holds checkpoints of an earlier run; continue it with --resume " +
                             (out / "last.safetensors").string() +
                             ", start afresh with --overwrite, or choose another --out");
  for (const fs::path& p : old) fs::remove(p);
}

void link_atomically(const std::filesystem::path& from, const std::filesystem::path& to) {
  namespace fs = std::filesystem;
  fs::path tmp = to;
  tmp += ".tmp";
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_hard_link(from, tmp, ec);
  if (ec) fs::copy_file(from, tmp, fs::copy_options::overwrite_existing);
  fs::rename(tmp, to);
}

}  // namespace moe
