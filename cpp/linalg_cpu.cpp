// CPU kernels of holokv::batched_eigh and holokv::batched_cholesky_solve through
// ATen's LAPACK ops, with the CUDA kernels' contract: the upper triangle is read,
// failures are reported in info instead of raised, and results are column-major.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "checks.h"

namespace holokv {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_eigh_cpu(const at::Tensor& a) {
  check_batched_eigh(a);
  const int64_t batch = a.size(0), n = a.size(1);
  const at::Tensor nonfinite = nonfinite_upper(a);
  const at::Tensor input = a.masked_fill(nonfinite.view({-1, 1, 1}), 0);
  at::Tensor w = at::empty({batch, n}, a.options());
  at::Tensor v = at::empty_like(a).mT();  // eigenvectors in columns, column-major like cuSOLVER's
  at::Tensor info = at::zeros({batch}, a.options().dtype(at::kInt));
  auto solve = [&](int64_t lo, int64_t hi) {
    auto [wi, vi] = at::linalg_eigh(input.slice(0, lo, hi), "U");
    w.slice(0, lo, hi).copy_(wi);
    v.slice(0, lo, hi).copy_(vi);
  };
  try {
    solve(0, batch);
  } catch (const c10::LinAlgError&) {
    // linalg_eigh raises for the whole batch; redo it matrix by matrix to flag the failures.
    for (int64_t i = 0; i < batch; ++i) {
      try {
        solve(i, i + 1);
      } catch (const c10::LinAlgError&) {
        info.data_ptr<int>()[i] = 1;
        w[i].fill_(NAN);
        v[i].fill_(NAN);
      }
    }
  }
  info.masked_fill_(nonfinite, -1);
  w.masked_fill_(nonfinite.view({-1, 1}), NAN);
  v.masked_fill_(nonfinite.view({-1, 1, 1}), NAN);
  return {w, v, info};
}

std::tuple<at::Tensor, at::Tensor> batched_cholesky_solve_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_batched_cholesky_solve(a, b);
  auto [u, info] = at::linalg_cholesky_ex(a, /*upper=*/true);
  at::Tensor x = at::empty({b.size(0), b.size(2), b.size(1)}, b.options()).mT();  // column-major
  x.copy_(at::cholesky_solve(b, u, /*upper=*/true));
  x.masked_fill_((info != 0).view({-1, 1, 1}), 0);  // a failed factorization solves nothing
  return {x, info};
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) {
  m.impl("batched_eigh", &batched_eigh_cpu);
  m.impl("batched_cholesky_solve", &batched_cholesky_solve_cpu);
}

}  // namespace holokv
