// The op that moves rows between processes, for expert parallelism.
#include <algorithm>
#include <numeric>

#include "moe/dist/comm.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

Tensor exchange_rows(Graph& g, const Tensor& x, const int64_t* send_rows, const int64_t* recv_rows) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(x.ndim() == 2, "exchange_rows", "input must be [n, C], got " + x.shape.str());
  const int64_t R = dist::size(), C = x.size(1);
  const int64_t n_send = std::accumulate(send_rows, send_rows + R, int64_t(0));
  const int64_t n_recv = std::accumulate(recv_rows, recv_rows + R, int64_t(0));
  MOE_CHECK(n_send == x.size(0), "exchange_rows",
        "sends " + std::to_string(n_send) + " rows but the input has " + std::to_string(x.size(0)));
  Tensor y = g.output({n_recv, C}, x);
  dist::alltoallv_rows(x.data, send_rows, y.data, recv_rows, C);
  if (y.requires_grad()) {
    auto* counts = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(2 * R)));
    std::copy(send_rows, send_rows + R, counts);
    std::copy(recv_rows, recv_rows + R, counts + R);
    float* back = g.arena().alloc_floats(std::max<int64_t>(1, n_send * C));
    g.record([=] {
      dist::alltoallv_rows(y.grad, counts + R, back, counts, C);  // the reverse exchange
      for (int64_t i = 0; i < n_send * C; ++i) x.grad[i] += back[i];
    });
  }
  return y;
}

}  // namespace moe
