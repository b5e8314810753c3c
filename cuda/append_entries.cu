// CUDA kernel of holokv::append_entries (append_entries_cpu.cpp says what it does).
//
// One block per sequence: its threads copy the new K and V rows of every head in 16-byte pieces (a row is
// d·size bytes, 256 for d = 128 in 16 bits; the new rows may lie at any batch and head strides), then, after a
// barrier that keeps every read of a length before its update, advance the lengths. One launch replaces a
// scatter per tensor plus an add. A length outside [0, cap) cannot be reported without a host sync: that
// sequence (or head) writes nothing and its length becomes cap + 1, which holo_decode turns into NaN, as
// holo_append does with a tail that overflows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"

namespace holokv {
namespace {

template <typename Piece>
__global__ void append_entries_kernel(const Piece* __restrict__ k, const Piece* __restrict__ v,
                                      Piece* __restrict__ k_cache, Piece* __restrict__ v_cache,
                                      int64_t* __restrict__ lens, char* __restrict__ bias, int bias_size, int H,
                                      int64_t cap, int pieces, bool per_head, RowStrides rs) {  // rs in pieces
  const int b = blockIdx.x;
  for (int i = threadIdx.x; i < 2 * H * pieces; i += blockDim.x) {
    const int kv = i / (H * pieces), h = i / pieces % H, c = i % pieces;
    const int64_t head = int64_t(b) * H + h, at = lens[per_head ? head : b];
    if (at < 0 || at >= cap) continue;
    const Piece* src = kv ? v + b * rs.vb + h * rs.vh : k + b * rs.kb + h * rs.kh;
    (kv ? v_cache : k_cache)[(head * cap + at) * pieces + c] = src[c];
  }
  if (bias)
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      const int64_t head = int64_t(b) * H + h, at = lens[per_head ? head : b];
      if (at < 0 || at >= cap) continue;
      char* p = bias + (head * cap + at) * bias_size;  // +0.0 in every float dtype
      for (int j = 0; j < bias_size; ++j) p[j] = 0;
    }
  __syncthreads();
  for (int h = threadIdx.x; h < (per_head ? H : 1); h += blockDim.x) {
    int64_t& n = lens[per_head ? int64_t(b) * H + h : b];
    n = n < 0 || n >= cap ? cap + 1 : n + 1;
  }
}

// Rows copied in pieces of the widest size (16, 8, 4, 2 or 1 bytes) that divides the row, every base address and
// the new rows' strides.
template <typename Piece>
void launch(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& lens, const std::optional<at::Tensor>& bias, const EntriesDims& ed) {
  const int pieces = int(ed.D * k.element_size() / int64_t(sizeof(Piece)));
  const int threads = int(std::min<int64_t>(1024, (2 * ed.H * pieces + 31) / 32 * 32));
  append_entries_kernel<Piece><<<unsigned(ed.B), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Piece*>(k.data_ptr()), static_cast<const Piece*>(v.data_ptr()),
      static_cast<Piece*>(k_cache.data_ptr()), static_cast<Piece*>(v_cache.data_ptr()), lens.data_ptr<int64_t>(),
      bias ? static_cast<char*>(bias->data_ptr()) : nullptr, bias ? int(bias->element_size()) : 0, int(ed.H),
      ed.cap, pieces, ed.per_head, row_strides(k, v, sizeof(Piece)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void append_entries_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& lens, const std::optional<at::Tensor>& bias) {
  const EntriesDims ed = check_append_entries(k, v, k_cache, v_cache, lens, bias);
  if (ed.B == 0 || ed.H == 0) return;
  c10::cuda::CUDAGuard guard(k.device());
  const int64_t size = k.element_size();
  uintptr_t align = uintptr_t(ed.D * size);
  for (const at::Tensor* t : {&k, &v, &k_cache, &v_cache}) align |= reinterpret_cast<uintptr_t>(t->data_ptr());
  for (const at::Tensor* t : {&k, &v}) align |= uintptr_t(t->stride(0) * size) | uintptr_t(t->stride(1) * size);
  if (align % 16 == 0)
    launch<int4>(k, v, k_cache, v_cache, lens, bias, ed);
  else if (align % 8 == 0)
    launch<int2>(k, v, k_cache, v_cache, lens, bias, ed);
  else if (align % 4 == 0)
    launch<int>(k, v, k_cache, v_cache, lens, bias, ed);
  else if (align % 2 == 0)
    launch<short>(k, v, k_cache, v_cache, lens, bias, ed);
  else
    launch<char>(k, v, k_cache, v_cache, lens, bias, ed);
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("append_entries", &append_entries_cuda); }

}  // namespace holokv
