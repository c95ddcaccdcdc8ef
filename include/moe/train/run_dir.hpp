// The run directory of moe train (logging.out_dir, or --out): a fresh run empties it of an
// earlier run's checkpoints only when told to, and last.safetensors is replaced atomically.
#pragma once

#include <filesystem>

namespace moe {

// A fresh run must not silently mix with, or overwrite, another run's checkpoints: throws,
// naming what would fix it, when `out` holds checkpoints and overwrite is false; otherwise
// deletes its checkpoints and metrics.jsonl.
void prepare_fresh_run_dir(const std::filesystem::path& out, bool overwrite);

// Makes `to` name the same bytes as `from`, atomically: a hard link (or, where the file system
// has none, a copy) to a temporary name, then a rename over `to`.
void link_atomically(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace moe
