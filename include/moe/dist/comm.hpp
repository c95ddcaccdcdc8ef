// Processes that train one model together, over MPI (Open MPI from Debian's packages).
//
// Built with MPI when CMake finds it (option MOE_MPI); MPI is initialised only when the
// process was started by mpirun, so a plain `moe ...` never touches it and a build without
// MPI is a group of one. Every call here is collective over all processes (MPI_COMM_WORLD):
// all ranks must make the same calls in the same order.
#pragma once

#include <cstdint>

namespace moe::dist {

// MPI_Init when built with MPI and started by mpirun (its environment variables are set);
// otherwise nothing. Throws when
// launched by mpirun with more than one process but built without MPI.
void init(int* argc, char*** argv);
// MPI_Finalize after init (idempotent).
void finalize();
// Ends every process at once (MPI_Abort) after an error on one of them; exit(code) alone
// when not running under MPI.
[[noreturn]] void abort_all(int code);

int rank();  // 0 without MPI
int size();  // 1 without MPI
// Processes of this run on this machine, this one included (1 without MPI).
int local_size();

// In place, over all ranks: x[i] = Σ_ranks x[i]. The result is the same on every rank.
void allreduce_sum(double* x, int64_t n);
// Starts the same sum over floats without waiting (MPI_Iallreduce): x must stay untouched until
// wait_all(). progress() lets pending sums advance (MPI_Testall); wait_all() finishes them.
void iallreduce_sum(float* x, int64_t n);
void progress();
void wait_all();
// out[r * n + i] = rank r's in[i]: out holds size() * n values.
void allgather(const int64_t* in, int64_t* out, int64_t n);
// Rows of `width` floats: send_rows[r] consecutive rows of `send` go to rank r (in rank
// order); recv receives recv_rows[r] rows from each rank r, in rank order.
void alltoallv_rows(const float* send, const int64_t* send_rows, float* recv, const int64_t* recv_rows,
                    int64_t width);
// x[0, n) from rank `root` to every rank.
void broadcast(float* x, int64_t n, int root);

}  // namespace moe::dist
