// CUDA kernel of holokv::holo_append (the CPU kernel, holo_append_cpu.cpp, says what it does).
//
// Each sequence's columns (K or V, head, dimension) are shared by the `parts` blocks of one thread block
// cluster (Hopper on; one block a sequence before it), so a step's few kilobytes a sequence are not a
// single block's serial chain of loads. Every block reads the sequence's counters; once the whole cluster
// has (a cluster barrier), the cluster's first block advances them, without a race. Each thread owns
// columns through every row it touches, so its reads and writes of a column keep their order with no
// barrier. The step is a chain of dependent memory round trips, so it is built to have two: what does not
// depend on the counters (the new values, the phase keys) is loaded while they are, then every row a
// thread's columns read (a closing slot's k exact rows, a batch of sinks) at once; only then are rows
// written. A slot that closes is summed in registers and written once (in the row slot_row gives: a
// window's ring overwrites its oldest); the sinks move past it through registers, 4 rows a round trip.
// Slots are never read back. Capacity cannot be checked on the host without a sync: a sequence that would
// overflow (or whose counters are not a reachable state) is left unchanged with tail_lens = T + 1, which
// holo_decode turns into NaN.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include "checks.h"
#include "decode_common.cuh"

namespace holokv {
namespace {

constexpr int SINK_BATCH = 4;  // sink rows moved per round trip

// x[n] = phase[i0 + n * stride] for n < N, the dtype switched on once so that the loads go out together
template <int N, typename A>
__device__ __forceinline__ void load_phases(A (&x)[N], const void* phase, int64_t i0, int64_t stride, Dtype t) {
  const auto load = [&](auto* typed) {
#pragma unroll
    for (int n = 0; n < N; ++n) x[n] = A(typed[i0 + n * stride]);
  };
  switch (t) {
    case Dtype::f32: return load(static_cast<const float*>(phase));
    case Dtype::f64: return load(static_cast<const double*>(phase));
    case Dtype::f16: return load(static_cast<const at::Half*>(phase));
    default: return load(static_cast<const at::BFloat16*>(phase));
  }
}

// Every block of a sequence has read its counters (a cluster's blocks, or one block's threads).
__device__ __forceinline__ void counters_read(int parts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (parts > 1) return cooperative_groups::this_cluster().sync();
#endif
  __syncthreads();
}

// KK = k tokens a slot; C columns a thread serves at once (in blocks of at most APPEND_THREADS, which leave
// each thread the registers for C columns' rows); `parts` blocks a sequence, one cluster
constexpr int APPEND_THREADS = 512;
constexpr int CLUSTER_THREADS = 256, MAX_PARTS = 8;  // 8: the portable cluster size
template <typename T, int KK, int C>
__global__ void __launch_bounds__(APPEND_THREADS)
    holo_append_kernel(const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ phase,
                       Dtype phase_dtype, T* __restrict__ k_slots, T* __restrict__ v_slots, T* __restrict__ k_tail,
                       T* __restrict__ v_tail, int64_t* __restrict__ slot_lens, int64_t* __restrict__ tail_lens,
                       int64_t* __restrict__ tail_start, int64_t* __restrict__ evicted, int H, int S, int T_, int D,
                       int64_t sinks, double exact_share, int64_t W, int parts, RowStrides rs) {  // rs in elements
  using acc_t = at::opmath_type<T>;
  const int b = blockIdx.x / parts, part = blockIdx.x % parts, HD = H * D;
  const int64_t base = int64_t(b) * H;
  // column i's new value: K's columns [0, HD), then V's
  const auto token = [&](int i) {
    const int h = i % HD / D, d = i % D;
    return i / HD ? v[b * rs.vb + h * rs.vh + d] : k[b * rs.kb + h * rs.kh + d];
  };
  // the first group of columns: its new values and phase keys go out with the counters
  const int i0 = part * C * int(blockDim.x) + threadIdx.x, stride = parts * C * int(blockDim.x);
  T x[C];
  acc_t ph[C][KK];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int i = min(i0 + c * int(blockDim.x), 2 * HD - 1);
    x[c] = token(i);
    load_phases(ph[c], phase, i % D, D, phase_dtype);
  }
  const int64_t sl = slot_lens[b], tl = tail_lens[b], start = tail_start[b], ev = evicted ? evicted[b] : 0;
  const int64_t valid = sl + tl;
  const int64_t close = closed_tokens(valid, sinks, KK, exact_share) - sl, held = slots_held(sl + close, KK, W);
  const bool bad = !slot_counters_ok(sl, ev, KK, S, W) || tl < 0 || tl > T_ || start < 0 || start >= T_ ||
                   held > int64_t(S) * KK || tl - close + 1 > T_;
  counters_read(parts);  // before the first block's thread 0 may change them
  const bool advances = part == 0 && threadIdx.x == 0;
  if (bad) {
    if (advances) tail_lens[b] = T_ + 1;
    return;
  }
  // past the checks every count fits an int (rows below 2 T, slots below S k): fewer registers
  const int n_sinks = int(valid < sinks ? valid : sinks), top = close > 0 ? n_sinks : 0, shut = int(close);
  const int lo = top > SINK_BATCH ? top - SINK_BATCH : 0;  // the sinks' last batch, moved first
  const int first = int(start), filled = int(tl);
  const auto row = [&](int i) { return first + i >= T_ ? first + i - T_ : first + i; };  // no division
  const int64_t slot0 = slot_row(sl, ev, 0, KK, W);
  const acc_t norm = acc_t(1.0 / sqrt(double(KK)));
  for (int g = i0; g < 2 * HD; g += stride) {
    T* th[C];
    T* sh[C];
    T r[C][KK], sk[C][SINK_BATCH];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int i = min(g + c * int(blockDim.x), 2 * HD - 1), kv = i / HD, h = i % HD / D, d = i % D;
      if (g != i0) {
        x[c] = token(i);
        load_phases(ph[c], phase, d, D, phase_dtype);
      }
      th[c] = (kv ? v_tail : k_tail) + (base + h) * T_ * D + d;
      sh[c] = (kv ? v_slots : k_slots) + (base + h) * S * D + d;
      if (shut > 0) {
#pragma unroll
        for (int t = 0; t < KK; ++t) r[c][t] = th[c][row(n_sinks + t) * D];
#pragma unroll
        for (int s = 0; s < SINK_BATCH; ++s)
          if (lo + s < top) sk[c][s] = th[c][row(lo + s) * D];
      }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (g + c * int(blockDim.x) >= 2 * HD) break;
      // each due block of k rows becomes one slot (more than one only where the rule closes several at once)
      for (int j = 0; j < shut / KK; ++j) {
        if (j > 0) {
#pragma unroll
          for (int t = 0; t < KK; ++t) r[c][t] = th[c][row(n_sinks + j * KK + t) * D];
        }
        acc_t acc = 0;
#pragma unroll
        for (int t = 0; t < KK; ++t) acc += acc_t(r[c][t]) * ph[c][t];
        sh[c][(j ? slot_row(sl, ev, j, KK, W) : slot0) * D] = T(acc * norm);
      }
      // rows [0, n_sinks) move to [close, close + n_sinks), the last batch first: a batch is read whole before
      // it is written, and its targets lie above every row a later (lower) batch reads
#pragma unroll
      for (int s = 0; s < SINK_BATCH; ++s)
        if (lo + s < top) th[c][row(shut + lo + s) * D] = sk[c][s];
      for (int hi = lo; hi > 0; hi -= SINK_BATCH) {
        const int from = hi > SINK_BATCH ? hi - SINK_BATCH : 0;
#pragma unroll
        for (int s = 0; s < SINK_BATCH; ++s)
          if (from + s < hi) sk[c][s] = th[c][row(from + s) * D];
#pragma unroll
        for (int s = 0; s < SINK_BATCH; ++s)
          if (from + s < hi) th[c][row(shut + from + s) * D] = sk[c][s];
      }
      th[c][row(filled) * D] = x[c];
    }
  }
  if (advances) {  // no later read of a counter: the other threads need not wait
    tail_start[b] = row(shut), tail_lens[b] = tl + 1 - close, slot_lens[b] = held;
    if (evicted) evicted[b] = ev + sl + close - held;
  }
}

template <typename T, int KK>
void launch_append(const AppendDims& ad, const at::Tensor& k, const at::Tensor& v, const at::Tensor& phase,
                   const at::Tensor& k_slots, const at::Tensor& v_slots, const at::Tensor& k_tail,
                   const at::Tensor& v_tail, const at::Tensor& slot_lens, const at::Tensor& tail_lens,
                   const at::Tensor& tail_start, int64_t sinks, double exact_share, int64_t window_slots,
                   const std::optional<at::Tensor>& evicted) {
  const int64_t columns = 2 * ad.H * ad.D;
  // Hopper on: a cluster of blocks a sequence, a column a thread; before: a block a sequence, a thread per C
  // columns where they fit in one block
  const int parts = at::cuda::getCurrentDeviceProperties()->major >= 9
                        ? int(std::min<int64_t>(MAX_PARTS, ceil_div(columns, CLUSTER_THREADS)))
                        : 1;
  constexpr int C_ONE = KK <= 4 ? 4 : KK == 8 ? 2 : 1;
  const auto launch = [&](auto kernel, int C) {
    const int threads = int(std::min<int64_t>(parts > 1 ? CLUSTER_THREADS : APPEND_THREADS,
                                              (ceil_div(ceil_div(columns, parts), C) + 31) / 32 * 32));
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(unsigned(ad.B * parts));
    config.blockDim = dim3(unsigned(threads));
    config.stream = at::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = unsigned(parts), cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = parts > 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &config, kernel, k.data_ptr<T>(), v.data_ptr<T>(), phase.data_ptr(), dtype_code(phase),
        k_slots.data_ptr<T>(), v_slots.data_ptr<T>(), k_tail.data_ptr<T>(), v_tail.data_ptr<T>(),
        slot_lens.data_ptr<int64_t>(), tail_lens.data_ptr<int64_t>(), tail_start.data_ptr<int64_t>(),
        window_slots ? evicted->data_ptr<int64_t>() : nullptr, int(ad.H), int(ad.S), int(ad.T), int(ad.D), sinks,
        exact_share, window_slots, parts, row_strides(k, v, k.element_size())));
  };
  if (parts > 1)
    launch(holo_append_kernel<T, KK, 1>, 1);
  else
    launch(holo_append_kernel<T, KK, C_ONE>, C_ONE);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "holo_append_cuda", [&] {
    const auto run = [&](auto kk) {
      launch_append<scalar_t, decltype(kk)::value>(ad, k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens,
                                                   tail_lens, tail_start, sinks, exact_share, window_slots, evicted);
    };
    switch (ad.k) {  // check_phase: a power of two up to 16
      case 1: return run(std::integral_constant<int, 1>{});
      case 2: return run(std::integral_constant<int, 2>{});
      case 4: return run(std::integral_constant<int, 4>{});
      case 8: return run(std::integral_constant<int, 8>{});
      default: return run(std::integral_constant<int, 16>{});
    }
  });
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("holo_append", &holo_append_cuda); }

}  // namespace holokv
