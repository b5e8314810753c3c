// CUDA kernel of holokv::holo_append (the CPU kernel, holo_append_cpu.cpp, says what it does).
//
// One block per sequence serves all its KV heads, K and V, so the sequence's counters are
// read once and advanced by the block's last step without a race. Each thread owns columns
// (K or V, head, dimension) through every row it touches, so its reads and writes of a column
// keep their order with no barrier. The step is a chain of dependent memory round trips, so
// it is built to have few: a slot that closes is summed in registers from the k exact rows of
// the tail ring loaded at once, and written once (in the row slot_row gives: a window's ring
// overwrites its oldest); the sinks move past it through registers, 8 rows a round trip.
// Slots are never read back. Capacity cannot be checked on the host without a sync: a
// sequence that would overflow (or whose counters are not a reachable state) is left
// unchanged with tail_lens = T + 1, which holo_decode turns into NaN.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "decode_common.cuh"

namespace holokv {
namespace {

constexpr int MAX_K = 16;     // phase.size(0), checked
constexpr int SINK_BATCH = 8;  // sink rows moved per round trip

template <typename T>
__global__ void __launch_bounds__(1024)
    holo_append_kernel(const T* __restrict__ k, const T* __restrict__ v, const void* phase, Dtype phase_dtype,
                       T* k_slots, T* v_slots, T* k_tail, T* v_tail, int64_t* slot_lens, int64_t* tail_lens,
                       int64_t* tail_start, int64_t* evicted, int H, int S, int T_, int D, int kk, int64_t sinks,
                       double exact_share, int64_t W) {
  using acc_t = at::opmath_type<T>;
  const int b = blockIdx.x;
  const int64_t sl = slot_lens[b], tl = tail_lens[b], start = tail_start[b], ev = evicted ? evicted[b] : 0;
  const int64_t valid = sl + tl;
  const int64_t close = closed_tokens(valid, sinks, kk, exact_share) - sl, held = slots_held(sl + close, kk, W);
  const bool bad = !slot_counters_ok(sl, ev, kk, S, W) || tl < 0 || tl > T_ || start < 0 || start >= T_ ||
                   held > int64_t(S) * kk || tl - close + 1 > T_;
  __syncthreads();  // every thread has read the counters before thread 0 may change them
  if (bad) {
    if (threadIdx.x == 0) tail_lens[b] = T_ + 1;
    return;
  }
  const int64_t n_sinks = valid < sinks ? valid : sinks;
  // every row offset used is below 2 T (start < T, offsets <= tl <= T): no division
  const auto row = [&](int64_t i) { return start + i >= T_ ? start + i - T_ : start + i; };
  const acc_t norm = acc_t(1.0 / sqrt(double(kk)));
  const int HD = H * D;
  const int64_t base = int64_t(b) * H;
  for (int i = threadIdx.x; i < 2 * HD; i += blockDim.x) {
    const int kv = i / HD, h = i % HD / D, d = i % D;
    const T x = (kv ? v : k)[base * D + i % HD];
    T* th = (kv ? v_tail : k_tail) + (base + h) * T_ * D + d;
    T* sh = (kv ? v_slots : k_slots) + (base + h) * S * D + d;
    for (int64_t j = 0; j < close / kk; ++j) {
      T r[MAX_K];
#pragma unroll
      for (int t = 0; t < MAX_K; ++t)
        if (t < kk) r[t] = th[row(n_sinks + j * kk + t) * D];
      acc_t acc = 0;
#pragma unroll
      for (int t = 0; t < MAX_K; ++t)
        if (t < kk) acc += acc_t(r[t]) * acc_t(load_float(phase, t * D + d, phase_dtype));
      sh[slot_row(sl, ev, j, kk, W) * D] = T(acc * norm);
    }
    // rows [0, n_sinks) move to [close, close + n_sinks), the last batch first: a batch is read whole before
    // it is written, and its targets lie above every row a later (lower) batch reads
    for (int64_t top = close > 0 ? n_sinks : 0; top > 0; top -= SINK_BATCH) {
      const int64_t lo = top > SINK_BATCH ? top - SINK_BATCH : 0;
      T r[SINK_BATCH];
#pragma unroll
      for (int s = 0; s < SINK_BATCH; ++s)
        if (lo + s < top) r[s] = th[row(lo + s) * D];
#pragma unroll
      for (int s = 0; s < SINK_BATCH; ++s)
        if (lo + s < top) th[row(close + lo + s) * D] = r[s];
    }
    th[row(tl) * D] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tail_start[b] = row(close), tail_lens[b] = tl + 1 - close, slot_lens[b] = held;
    if (evicted) evicted[b] = ev + sl + close - held;
  }
}

}  // namespace

void holo_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& phase, const at::Tensor& k_slots,
                      const at::Tensor& v_slots, const at::Tensor& k_tail, const at::Tensor& v_tail,
                      const at::Tensor& slot_lens, const at::Tensor& tail_lens, const at::Tensor& tail_start,
                      int64_t sinks, double exact_share, int64_t window_slots,
                      const std::optional<at::Tensor>& evicted) {
  const AppendDims ad = check_holo_append(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens,
                                          tail_start, sinks, exact_share, window_slots, evicted);
  if (ad.B == 0) return;
  c10::cuda::CUDAGuard guard(k.device());
  // a block per sequence, a thread per column of K and V where they fit in one block
  const int threads = int(std::min<int64_t>(1024, (2 * ad.H * ad.D + 31) / 32 * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "holo_append_cuda", [&] {
    holo_append_kernel<scalar_t><<<unsigned(ad.B), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), phase.data_ptr(), dtype_code(phase),
        k_slots.data_ptr<scalar_t>(), v_slots.data_ptr<scalar_t>(), k_tail.data_ptr<scalar_t>(),
        v_tail.data_ptr<scalar_t>(), slot_lens.data_ptr<int64_t>(), tail_lens.data_ptr<int64_t>(),
        tail_start.data_ptr<int64_t>(), window_slots ? evicted->data_ptr<int64_t>() : nullptr, int(ad.H),
        int(ad.S), int(ad.T), int(ad.D), int(ad.k), sinks, exact_share, window_slots);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("holo_append", &holo_append_cuda); }

}  // namespace holokv
