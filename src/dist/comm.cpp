#include "moe/dist/comm.hpp"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef MOE_HAVE_MPI
#include <mpi.h>
#endif

namespace moe::dist {

namespace {

bool g_initialised = false;
#ifdef MOE_HAVE_MPI
std::vector<MPI_Request> g_pending;  // started by iallreduce_sum
#endif
int g_rank = 0, g_size = 1, g_local_size = 1;

bool launched_by_mpirun() {
  // Open MPI sets OMPI_COMM_WORLD_SIZE, MPICH and others PMI_SIZE, PMIx launchers PMIX_RANK.
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

#ifndef MOE_HAVE_MPI
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
#endif

#ifdef MOE_HAVE_MPI
void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(std::string(what) + " failed: " + std::string(msg, size_t(len)));
}

// MPI counts are ints: large buffers go in pieces.
constexpr int64_t kMaxCount = int64_t(1) << 30;

int as_count(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) throw std::runtime_error(std::string(what) + ": " + std::to_string(n) + " values exceed MPI's int counts");
  return int(n);
}
#endif

}  // namespace

void init(int* argc, char*** argv) {
  if (!launched_by_mpirun() || g_initialised) return;
#ifdef MOE_HAVE_MPI
  int provided = 0;
  // Only the main thread calls MPI (OpenMP threads never do).
  check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  g_initialised = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  MPI_Comm node;  // the processes that share this machine's memory
  check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type");
  MPI_Comm_size(node, &g_local_size);
  MPI_Comm_free(&node);
#else
  (void)argc;
  (void)argv;
  const int n = env_int("OMPI_COMM_WORLD_SIZE", env_int("PMI_SIZE", 1));
  if (n > 1)
    throw std::runtime_error("this moe was built without MPI, so mpirun started " + std::to_string(n) +
                             " separate copies; install Open MPI (bash scripts/setup.sh --mpi) and rebuild");
#endif
}

void finalize() {
#ifdef MOE_HAVE_MPI
  if (g_initialised) MPI_Finalize();
#endif
  g_initialised = false;
  g_rank = 0;
  g_size = 1;
  g_local_size = 1;
}

void abort_all(int code) {
#ifdef MOE_HAVE_MPI
  if (g_initialised && g_size > 1) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::exit(code);
}

int rank() { return g_rank; }
int size() { return g_size; }
int local_size() { return g_local_size; }

#ifdef MOE_HAVE_MPI
void allreduce_sum(double* x, int64_t n) {
  if (g_size == 1) return;
  for (int64_t i = 0; i < n; i += kMaxCount)
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, x + i, int(std::min(kMaxCount, n - i)), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD),
              "MPI_Allreduce");
}

void iallreduce_sum(float* x, int64_t n) {
  if (g_size == 1) return;
  for (int64_t i = 0; i < n; i += kMaxCount) {
    g_pending.emplace_back();
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, x + i, int(std::min(kMaxCount, n - i)), MPI_FLOAT, MPI_SUM,
                             MPI_COMM_WORLD, &g_pending.back()),
              "MPI_Iallreduce");
  }
}

void progress() {
  if (g_pending.empty()) return;
  int done = 0;
  check_mpi(MPI_Testall(int(g_pending.size()), g_pending.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
  if (done) g_pending.clear();
}

void wait_all() {
  if (g_pending.empty()) return;
  check_mpi(MPI_Waitall(int(g_pending.size()), g_pending.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  g_pending.clear();
}

void allgather(const int64_t* in, int64_t* out, int64_t n) {
  if (g_size == 1) {
    std::copy(in, in + n, out);
    return;
  }
  const int c = as_count(n, "allgather");
  check_mpi(MPI_Allgather(in, c, MPI_INT64_T, out, c, MPI_INT64_T, MPI_COMM_WORLD), "MPI_Allgather");
}

void alltoallv_rows(const float* send, const int64_t* send_rows, float* recv, const int64_t* recv_rows,
                    int64_t width) {
  const size_t R = size_t(g_size);
  thread_local std::vector<int> counts;  // reused: no allocation per exchange
  counts.assign(4 * R, 0);
  int *sc = counts.data(), *sd = sc + R, *rc = sd + R, *rd = rc + R;
  int64_t s = 0, r = 0;
  for (size_t i = 0; i < R; ++i) {
    sc[i] = as_count(send_rows[i] * width, "alltoallv");
    sd[i] = as_count(s, "alltoallv");
    rc[i] = as_count(recv_rows[i] * width, "alltoallv");
    rd[i] = as_count(r, "alltoallv");
    s += send_rows[i] * width;
    r += recv_rows[i] * width;
  }
  if (g_size == 1) {
    std::copy(send, send + s, recv);
    return;
  }
  check_mpi(MPI_Alltoallv(send, sc, sd, MPI_FLOAT, recv, rc, rd, MPI_FLOAT,
                          MPI_COMM_WORLD),
            "MPI_Alltoallv");
}

void broadcast(float* x, int64_t n, int root) {
  if (g_size == 1) return;
  for (int64_t i = 0; i < n; i += kMaxCount)
    check_mpi(MPI_Bcast(x + i, int(std::min(kMaxCount, n - i)), MPI_FLOAT, root, MPI_COMM_WORLD), "MPI_Bcast");
}
#else
void allreduce_sum(double*, int64_t) {}
void iallreduce_sum(float*, int64_t) {}
void progress() {}
void wait_all() {}
void allgather(const int64_t* in, int64_t* out, int64_t n) { std::copy(in, in + n, out); }
void alltoallv_rows(const float* send, const int64_t* send_rows, float* recv, const int64_t*, int64_t width) {
  std::copy(send, send + send_rows[0] * width, recv);
}
void broadcast(float*, int64_t, int) {}
#endif

}  // namespace moe::dist
