// CUDA kernel of holokv::decode_linear: y [M, N] = x [M, K] weightᵀ for the M <= 16 tokens of a decode step,
// a read of the weight at memory bandwidth.
//
// The M rows of x are the 16 rows of mma.m16n8k16 (rows past M are zeros). A block computes 8 NT weight rows
// (NT n-tiles of 8), its warps each a K range of them (split-K inside the block, summed in shared memory at
// the end, so there is one launch and no workspace). A warp streams its range in chunks of 32 K columns
// (NT · 8 weight rows and the 16 x rows, 64 bytes each) through a ring of LIN_STAGES chunks in shared memory
// with cp.async, so that several chunks are in flight while one is multiplied. Within a chunk, a lane reads
// 16 bytes of a row, 8 consecutive columns; the mma's k order is permuted alike in x and the weight (lane
// quad q feeds logical columns 2q, 2q + 1, 2q + 8, 2q + 9 of a k-step from physical columns 8q..8q + 7), so
// every fragment is one 16-byte shared-memory read with no bank conflict.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <mutex>
#include <set>

#include "checks.h"
#include "warp_ops.cuh"

namespace holokv {
namespace {

constexpr int LIN_WARPS = 8;   // a block's warps, each a K range of its rows
constexpr int LIN_STAGES = 4;  // chunks of 32 columns in a warp's ring
constexpr int ROWS_X = int(DECODE_LINEAR_ROWS);

template <int NT>
constexpr int stage_elems() { return (8 * NT + ROWS_X) * 32; }  // weight rows, then x rows, 32 columns each
template <typename T, int NT>
constexpr size_t linear_smem_bytes() { return size_t(LIN_WARPS) * LIN_STAGES * stage_elems<NT>() * sizeof(T); }

template <typename T, int NT>
__global__ void __launch_bounds__(LIN_WARPS * 32)
    decode_linear_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int M, int N, int K) {
  constexpr int ROWS = 8 * NT, STAGE = stage_elems<NT>();
  constexpr int PIECES = (ROWS + ROWS_X) * 4;  // 16-byte pieces of a chunk
  static_assert(PIECES % 32 == 0, "a chunk's pieces are whole passes of the warp");
  extern __shared__ float4 smem4[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* ring = reinterpret_cast<T*>(smem4) + warp * LIN_STAGES * STAGE;
  const int n0 = blockIdx.x * ROWS;
  const int chunks = (K + 31) / 32, per = (chunks + LIN_WARPS - 1) / LIN_WARPS;
  const int c_begin = min(chunks, warp * per), n_chunks = min(chunks, c_begin + per) - c_begin;

  // chunk c into stage st: weight rows past N, x rows past M and columns past K are zero-filled (not read)
  const auto load = [&](int c, int st) {
    T* dst = ring + st * STAGE;
#pragma unroll
    for (int i = lane; i < PIECES; i += 32) {
      const int r = i / 4, col = c * 32 + i % 4 * 8;
      const bool is_w = r < ROWS;
      const bool ok = col < K && (is_w ? n0 + r < N : r - ROWS < M);
      const T* src = is_w ? w + int64_t(n0 + r) * K + col : x + int64_t(r - ROWS) * K + col;
      cp_async16(dst + r * 32 + i % 4 * 8, ok ? src : w, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < LIN_STAGES - 1; ++s) {
    if (s < n_chunks) load(c_begin + s, s);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  float acc[NT][4] = {};
  const int q8 = lane % 4 * 8, r = lane / 4;
  for (int i = 0; i < n_chunks; ++i) {
    cp_async_wait<LIN_STAGES - 2>();  // chunk i has landed (this lane's copies) ...
    __syncwarp();                     // ... and every lane's; all are done with chunk i - 1's stage
    if (i + LIN_STAGES - 1 < n_chunks) load(c_begin + i + LIN_STAGES - 1, (i + LIN_STAGES - 1) % LIN_STAGES);
    cp_async_commit();
    const T* st = ring + (i % LIN_STAGES) * STAGE;
    const uint4 xa = *reinterpret_cast<const uint4*>(st + (ROWS + r) * 32 + q8);
    const uint4 xb = *reinterpret_cast<const uint4*>(st + (ROWS + r + 8) * 32 + q8);
    const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y}, a1[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 wv = *reinterpret_cast<const uint4*>(st + (8 * j + r) * 32 + q8);
      mma16816<T>(acc[j], a0, wv.x, wv.y);
      mma16816<T>(acc[j], a1, wv.z, wv.w);
    }
  }
  cp_async_wait<0>();
  __syncwarp();
  // the warps' sums meet in shared memory (each warp's own ring, no longer read): [16][ROWS] floats a warp
  float* part = reinterpret_cast<float*>(ring);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = 8 * j + lane % 4 * 2;
    part[r * ROWS + col] = acc[j][0], part[r * ROWS + col + 1] = acc[j][1];
    part[(r + 8) * ROWS + col] = acc[j][2], part[(r + 8) * ROWS + col + 1] = acc[j][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < M * ROWS; i += blockDim.x) {
    const int m = i / ROWS, col = i % ROWS;
    if (n0 + col >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < LIN_WARPS; ++v)
      sum += reinterpret_cast<const float*>(reinterpret_cast<const T*>(smem4) + v * LIN_STAGES * STAGE)[i];
    y[int64_t(m) * N + n0 + col] = T(sum);
  }
}

// NT weight rows a block: 4 n-tiles where that still gives two blocks an SM, else 2 (more blocks for the
// small projections, at twice the x reads a weight byte).
template <typename T, int NT>
void launch_linear(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, int64_t M, int64_t N, int64_t K) {
  const auto kernel = decode_linear_kernel<T, NT>;
  constexpr size_t smem = linear_smem_bytes<T, NT>();
  {
    static std::mutex mutex;
    static std::set<int> ready;  // devices whose attribute is set
    const std::lock_guard<std::mutex> lock(mutex);
    if (ready.insert(int(at::cuda::current_device())).second)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  kernel<<<unsigned(ceil_div(N, 8 * NT)), LIN_WARPS * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), weight.data_ptr<T>(), y.data_ptr<T>(), int(M), int(N), int(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const auto [M, N, K] = check_decode_linear(x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0 && K % 8 == 0;
  if (!(dtype == at::kHalf || dtype == at::kBFloat16) || !aligned || N > INT_MAX || K > INT_MAX) {
    // rows read in 16-byte pieces by tensor cores: other dtypes and layouts take a plain GEMM, alike
    const auto acc = at::toOpMathType(dtype);
    return at::mm(x.to(acc), weight.to(acc).t()).to(dtype);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool wide = ceil_div(N, 32) >= 2 * sms;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "decode_linear_cuda", [&] {
    if (wide)
      launch_linear<scalar_t, 4>(x, weight, y, M, N, K);
    else
      launch_linear<scalar_t, 2>(x, weight, y, M, N, K);
  });
  return y;
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }

}  // namespace holokv
