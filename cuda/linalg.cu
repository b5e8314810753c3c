// CUDA kernels of holokv::batched_eigh and holokv::batched_cholesky_solve: one batched
// cuSOLVER/cuBLAS call per chunk of matrices, workspace from torch's caching allocator,
// info left on the device (no host synchronization anywhere).
//
// cuSOLVER and cuBLAS are column-major. A symmetric row-major matrix is its own
// column-major image, and their LOWER triangle is our row-major upper triangle, which
// is the one read (the CPU kernels read the same one).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cusolver_handle.h"

#define HOLOKV_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                             \
    const cublasStatus_t holokv_status = (expr);                                                   \
    TORCH_CHECK(holokv_status == CUBLAS_STATUS_SUCCESS, #expr, " failed: ",                         \
                cublasGetStatusString(holokv_status));                                             \
  } while (0)

namespace holokv {
namespace {

constexpr cublasFillMode_t kUplo = CUBLAS_FILL_MODE_LOWER;
constexpr cusolverEigMode_t kJob = CUSOLVER_EIG_MODE_VECTOR;
constexpr int64_t kMaxCallBatch = 65535;
constexpr size_t kMaxWorkspaceBytes = size_t(1) << 30;

// Matrices per library call. Some batched routines put the batch on a grid dimension
// capped at 65535 (cusolverDnXsyevBatched_bufferSize refuses 65536), XsyevBatched needs
// n * n * batch < 2^31, and its workspace grows with the batch: the chunk is halved
// until bytes(chunk) fits in 1 GiB.
template <typename Bytes>
int64_t call_batch(int64_t batch, int64_t n, Bytes bytes) {
  int64_t chunk = std::min({batch, kMaxCallBatch, std::max<int64_t>(1, INT_MAX / (n * n))});
  while (chunk > 1 && bytes(chunk) > kMaxWorkspaceBytes) chunk = (chunk + 1) / 2;
  return chunk;
}

template <typename Call>
void for_chunks(int64_t batch, int64_t chunk, Call call) {
  for (int64_t lo = 0; lo < batch; lo += chunk) call(lo, static_cast<int>(std::min(chunk, batch - lo)));
}

c10::DataPtr device_workspace(size_t bytes) { return at::cuda::getCUDADeviceAllocator()->allocate(bytes); }

__global__ void strided_pointers_kernel(float** out, float* base, int64_t stride, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) out[i] = base + i * stride;
}

// The pointer array {base + i * stride : i < count} that cuSOLVER/cuBLAS's pointer-array
// batched routines take, written by a kernel so that no host-to-device copy is needed.
at::Tensor strided_pointers(float* base, int64_t stride, int64_t count, const at::Tensor& like) {
  static_assert(sizeof(float*) == sizeof(int64_t), "pointer arrays are stored as int64");
  at::Tensor ptrs = at::empty({count}, like.options().dtype(at::kLong));
  const int threads = 256;
  strided_pointers_kernel<<<ceil_div(count, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<float**>(ptrs.data_ptr<int64_t>()), base, stride, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ptrs;
}

float** pointers_at(const at::Tensor& ptrs, int64_t offset) {
  return reinterpret_cast<float**>(ptrs.data_ptr<int64_t>()) + offset;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_eigh_cuda(const at::Tensor& a) {
  check_batched_eigh(a);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), n = a.size(1);
  // cuSOLVER overwrites the matrix with its eigenvectors in (column-major) columns, i.e. in
  // our rows: v is the transposed view, column-major like torch.linalg.eigh's.
  const at::Tensor nonfinite = nonfinite_upper(a);
  at::Tensor vecs = a.masked_fill(nonfinite.view({-1, 1, 1}), 0);
  at::Tensor w = at::empty({batch, n}, a.options());
  at::Tensor info = at::zeros({batch}, a.options().dtype(at::kInt));
  if (batch == 0 || n == 0) return {w, vecs.mT(), info};
  const SolverHandle h = current_solver();
  float* A = vecs.data_ptr<float>();
  float* W = w.data_ptr<float>();
  int* I = info.data_ptr<int>();
  const int ni = static_cast<int>(n);
  if (n <= 32) {
    // Batched Jacobi (syevjBatched), which cuSOLVER supports up to n = 32 only.
    auto lwork = [&](int64_t count) {
      int floats = 0;
      HOLOKV_CUSOLVER_CHECK(cusolverDnSsyevjBatched_bufferSize(h.dn, kJob, kUplo, ni, A, ni, W, &floats, h.syevj,
                                                               static_cast<int>(count)));
      return floats;
    };
    const int64_t chunk = call_batch(batch, n, [&](int64_t c) { return sizeof(float) * size_t(lwork(c)); });
    const int floats = lwork(chunk);
    c10::DataPtr work = device_workspace(sizeof(float) * size_t(floats));
    for_chunks(batch, chunk, [&](int64_t lo, int count) {
      HOLOKV_CUSOLVER_CHECK(cusolverDnSsyevjBatched(h.dn, kJob, kUplo, ni, A + lo * n * n, ni, W + lo * n,
                                                    static_cast<float*>(work.get()), floats, I + lo, h.syevj,
                                                    count));
    });
  } else {
    // n > 32: cuSOLVER's one batched symmetric eigensolver without that limit, the 64-bit
    // API's syevBatched (QR-based, full accuracy). torch.linalg.eigh loops over the batch
    // here, one syevj per matrix; gesvda and randomized subspaces trade accuracy.
    auto sizes = [&](int64_t count) {
      size_t device_bytes = 0, host_bytes = 0;
      HOLOKV_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(h.dn, h.params, kJob, kUplo, n, CUDA_R_32F, A, n,
                                                              CUDA_R_32F, W, CUDA_R_32F, &device_bytes,
                                                              &host_bytes, count));
      return std::make_pair(device_bytes, host_bytes);
    };
    const int64_t chunk = call_batch(batch, n, [&](int64_t c) { return sizes(c).first; });
    const std::pair<size_t, size_t> bytes = sizes(chunk);
    c10::DataPtr work = device_workspace(bytes.first);
    std::vector<char> host_work(bytes.second);
    for_chunks(batch, chunk, [&](int64_t lo, int count) {
      HOLOKV_CUSOLVER_CHECK(cusolverDnXsyevBatched(h.dn, h.params, kJob, kUplo, n, CUDA_R_32F, A + lo * n * n, n,
                                                   CUDA_R_32F, W + lo * n, CUDA_R_32F, work.get(), bytes.first,
                                                   host_work.data(), bytes.second, I + lo, count));
    });
  }
  info.masked_fill_(nonfinite, -1);
  w.masked_fill_(nonfinite.view({-1, 1}), NAN);
  vecs.masked_fill_(nonfinite.view({-1, 1, 1}), NAN);
  return {w, vecs.mT(), info};
}

std::tuple<at::Tensor, at::Tensor> batched_cholesky_solve_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_batched_cholesky_solve(a, b);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), n = a.size(1), k = b.size(2);
  // The solution overwrites a column-major copy of b: a [batch, k, n] buffer whose
  // transpose is x.
  at::Tensor factor = a.clone();
  at::Tensor xbuf = b.mT().contiguous();
  at::Tensor info = at::zeros({batch}, a.options().dtype(at::kInt));
  if (batch == 0 || n == 0) return {xbuf.mT(), info};  // with k == 0 the factorizations still report info
  at::Tensor a_ptrs = strided_pointers(factor.data_ptr<float>(), n * n, batch, a);
  at::Tensor x_ptrs = strided_pointers(xbuf.data_ptr<float>(), n * k, batch, a);
  const cusolverDnHandle_t solver = current_solver().dn;
  const cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();  // on torch's current stream
  const int ni = static_cast<int>(n), ki = static_cast<int>(k);
  const float one = 1.0f;
  const int64_t chunk = call_batch(batch, n, [](int64_t) { return size_t(0); });
  for_chunks(batch, chunk, [&](int64_t lo, int count) {
    float** A = pointers_at(a_ptrs, lo);
    float** X = pointers_at(x_ptrs, lo);
    HOLOKV_CUSOLVER_CHECK(cusolverDnSpotrfBatched(solver, kUplo, ni, A, ni, info.data_ptr<int>() + lo, count));
    // a = L Lᵀ, x = L⁻ᵀ (L⁻¹ b): two batched triangular solves over all k columns at once.
    // (cusolverDnSpotrsBatched takes a single right-hand side: it would re-read each
    // factor k times, as k * batch matrix-vector solves.)
    for (const cublasOperation_t op : {CUBLAS_OP_N, CUBLAS_OP_T})
      if (k > 0) HOLOKV_CUBLAS_CHECK(cublasStrsmBatched(blas, CUBLAS_SIDE_LEFT, kUplo, op, CUBLAS_DIAG_NON_UNIT, ni, ki, &one,
                                             A, ni, X, ni, count));
  });
  at::Tensor x = xbuf.mT();
  x.masked_fill_((info != 0).view({batch, 1, 1}), 0);  // a failed factorization solves nothing
  return {x, info};
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) {
  m.impl("batched_eigh", &batched_eigh_cuda);
  m.impl("batched_cholesky_solve", &batched_cholesky_solve_cuda);
}

}  // namespace holokv
