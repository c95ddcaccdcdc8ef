#include "moe/train/run_dir.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace moe {

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
