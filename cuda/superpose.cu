// CUDA kernel of holokv::superpose: one thread per output element; it reads the
// k tokens of its slot (coalesced across the warp), sums them in fp32 and
// writes the slot once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"

namespace holokv {

template <typename T>
__global__ void superpose_kernel(const T* __restrict__ x, const float* __restrict__ phi, T* __restrict__ out,
                                 int64_t rows, int64_t N, int64_t S, int D, int k, float norm) {
  using acc_t = at::opmath_type<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * D) return;
  const int d = int(idx % D);
  const int64_t row = idx / D, bh = row / S, s = row % S;
  const T* xr = x + (bh * N + s * k) * D + d;
  const int n = int(min(int64_t(k), N - s * k));
  acc_t acc = 0;
  for (int t = 0; t < n; ++t) acc += acc_t(xr[int64_t(t) * D]) * acc_t(phi[t * D + d]);
  out[idx] = T(acc * acc_t(norm));
}

at::Tensor superpose_cuda(const at::Tensor& x, const at::Tensor& phase) {
  check_superpose(x, phase);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3), k = phase.size(0);
  const int64_t S = ceil_div(N, k);
  at::Tensor out = at::empty({B, H, S, D}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor phi = phase.to(at::kFloat).contiguous();
  const int threads = 256;
  const int64_t blocks = ceil_div(out.numel(), threads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "superpose_cuda", [&] {
    superpose_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), phi.data_ptr<float>(), out.data_ptr<scalar_t>(), B * H * S, N, S, int(D),
        int(k), float(1.0 / std::sqrt(double(k))));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("superpose", &superpose_cuda); }

}  // namespace holokv
