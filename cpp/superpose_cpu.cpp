// CPU reference kernel of holokv::superpose: slot_s = sum_t x[s*k+t] * Phi_t / sqrt(k).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace holokv {

at::Tensor superpose_cpu(const at::Tensor& x, const at::Tensor& phase) {
  check_superpose(x, phase);
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3), k = phase.size(0);
  const int64_t S = ceil_div(N, k);
  at::Tensor out = at::empty({B, H, S, D}, x.options());
  at::Tensor phi = phase.to(at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "superpose_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* pp = phi.data_ptr<double>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t norm = acc_t(1.0 / std::sqrt(double(k)));
    at::parallel_for(0, B * H * S, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(D);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t bh = row / S, s = row % S;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = 0; t < k && s * k + t < N; ++t) {
          const scalar_t* xr = xp + (bh * N + s * k + t) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += acc_t(xr[d]) * acc_t(pp[t * D + d]);
        }
        for (int64_t d = 0; d < D; ++d) op[row * D + d] = scalar_t(acc[d] * norm);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) { m.impl("superpose", &superpose_cpu); }

}  // namespace holokv
