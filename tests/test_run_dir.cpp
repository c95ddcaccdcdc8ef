// The run directory's lock: one run writes a directory at a time. A second run, even one
// started at the same instant, stops with an error naming the holder's process id and leaves
// every file as it was; a lock left by a process that died blocks nobody.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <map>
#include <regex>
#include <string>

#include "cli_util.hpp"
#include "io_test_util.hpp"
#include "moe/train/run_dir.hpp"

using namespace moe;
using namespace moe_test;

namespace {

const std::string kData = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";

std::string config_json(int64_t max_steps) {
  return R"({"data": {"path": ")" + kData + R"("},
    "model": {"block_size": 8, "n_embed": 16, "n_head": 2, "n_layer": 1},
    "router": {"num_experts": 4, "top_k": 2},
    "training": {"batch_size": 4, "max_steps": )" + std::to_string(max_steps) + R"(, "threads": 1},
    "logging": {"log_interval": 4, "eval_interval": 6, "eval_iters": 2, "checkpoint_interval": 6}})";
}

// Every file of a directory (recursively) and its bytes.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[e.path().string()] = read_file(e.path().string());
  return files;
}

// d/run holding a finished 12-step run (checkpoints, metrics, config) of the config d/c.json.
std::string finished_run(const TempDir& d) {
  write_file(d / "c.json", config_json(12));
  const std::string run = d / "run";
  REQUIRE(run_moe("train --config " + (d / "c.json") + " --out " + run).code == 0);
  return run;
}

}  // namespace

TEST_CASE("a second lock on a run directory fails naming the holder; the lock ends with its holder",
          "[train][lock]") {
  TempDir d("lock_unit");
  const fs::path dir = d.path / "run";
  {
    RunDirLock held(dir);  // creates the directory
    CHECK(read_file(run_lock_path(dir).string()) == std::to_string(::getpid()) + "\n");
    // flock locks belong to an open file, so a second one conflicts even in this process.
    const std::string e = error_of([&] { RunDirLock second(dir); });
    CHECK_THAT(e, Catch::Contains("run directory " + dir.string() + " is in use by another moe run (process " +
                                  std::to_string(::getpid()) + ","));
    CHECK_THAT(e, Catch::Contains("run.lock"));
  }
  CHECK(read_file(run_lock_path(dir).string()).empty());  // released: no holder named
  RunDirLock again(dir);
}

TEST_CASE("a locked run directory refuses fresh, --overwrite and --resume runs and keeps every file",
          "[cli][reliability][lock]") {
  TempDir d("lock_refuse");
  const std::string run = finished_run(d);
  {
    RunDirLock held(run);  // as a run of this process would hold it
    const auto before = snapshot(run);
    for (const std::string& how : {std::string(), std::string(" --overwrite"), " --resume " + run + "/last.safetensors"}) {
      const Run r = run_moe("train --config " + (d / "c.json") + " --out " + run + how);
      INFO("moe train" << how << "\n" << r.out);
      CHECK(r.code == 1);
      CHECK(r.out.rfind("moe: error: run directory " + run + " is in use by another moe run (process " +
                            std::to_string(::getpid()) + ", which holds " + run + "/run.lock)",
                        0) == 0);
      CHECK(snapshot(run) == before);
    }
  }
  const Run r = run_moe("train --config " + (d / "c.json") + " --out " + run + " --overwrite");
  INFO(r.out);
  CHECK(r.code == 0);
}

TEST_CASE("two trainings started at once on one directory: one runs, the other names its process id",
          "[cli][reliability][lock]") {
  TempDir d("lock_race");
  write_file(d / "c.json", config_json(1000000));
  // Both start together. As soon as one has ended, the other is interrupted (SIGINT: it saves
  // and exits 130); then the shell reports each one's process id and exit status.
  const std::string train = std::string(MOE_BINARY) + " train --config " + (d / "c.json") + " --out " + (d / "run");
  for (int round = 0; round < 3; ++round) {
    const std::string how = round == 0 ? "" : " --overwrite";  // later rounds find checkpoints
    const Run r = run_shell(train + how + " > " + (d / "a.log") + " 2>&1 & a=$!; " + train + how + " > " +
                            (d / "b.log") + " 2>&1 & b=$!; "
                            "while kill -0 $a 2>/dev/null && kill -0 $b 2>/dev/null; do sleep 0.05; done; "
                            "kill -INT $a $b 2>/dev/null; wait $a; ea=$?; wait $b; eb=$?; "
                            "echo \"$a $ea $b $eb\"");
    INFO("round " << round << ": " << r.out << "\na.log: " << read_file(d / "a.log") << "\nb.log: "
                  << read_file(d / "b.log"));
    std::smatch m;
    const std::string out = r.out;
    REQUIRE(std::regex_search(out, m, std::regex(R"((\d+) (\d+) (\d+) (\d+))")));
    const bool a_won = m[2] == "130";
    const std::string winner = a_won ? m[1] : m[3], loser_code = a_won ? m[4] : m[2];
    const std::string loser_log = read_file(d / (a_won ? "b.log" : "a.log"));
    CHECK((m[2] == "130" || m[4] == "130"));
    CHECK(loser_code == "1");
    CHECK(loser_log.rfind("moe: error: run directory " + (d / "run") + " is in use by another moe run (process " +
                              winner + ",",
                          0) == 0);
  }
}

TEST_CASE("a lock file left by a killed run does not block the next run", "[cli][reliability][lock]") {
  TempDir d("lock_stale");
  write_file(d / "c.json", config_json(12));
  const std::string run = d / "run";
  // kill -9 in the middle of the first checkpoint: the lock file still names the dead process.
  const Run killed = run_shell("MOE_TEST_KILL_AFTER_WRITES=5 " + std::string(MOE_BINARY) + " train --config " +
                               (d / "c.json") + " --out " + run + " >/dev/null 2>&1 & p=$!; wait $p; echo $p $?");
  INFO(killed.out);
  REQUIRE_THAT(killed.out, Catch::EndsWith(" 137\n"));
  const std::string dead_pid = killed.out.substr(0, killed.out.find(' '));
  CHECK(read_file(run + "/run.lock") == dead_pid + "\n");
  const Run r = run_moe("train --config " + (d / "c.json") + " --out " + run + " --overwrite");
  INFO(r.out);
  CHECK(r.code == 0);
}

#ifdef MOE_HAVE_MPI
TEST_CASE("under mpirun a locked run directory stops every rank with the holder's process id",
          "[mpi][lock]") {
  TempDir d("lock_mpi");
  const std::string run = finished_run(d);
  RunDirLock held(run);
  const auto before = snapshot(run);
  const Run r = run_shell("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun -np 2 "
                          "--oversubscribe --bind-to none " + std::string(MOE_BINARY) + " train --config " +
                          (d / "c.json") + " --out " + run + " --overwrite");
  INFO(r.out);
  CHECK(r.code != 0);
  CHECK(r.code != 124);  // not the timeout: no rank was left waiting
  CHECK_THAT(r.out, Catch::Contains("is in use by another moe run (process " + std::to_string(::getpid()) + ","));
  CHECK(snapshot(run) == before);
}
#endif  // MOE_HAVE_MPI
