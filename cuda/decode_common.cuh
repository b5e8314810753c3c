// Shared by holo_decode's split kernels (decode_simt.cuh, decode_mma.cuh) and
// their launcher (holo_decode.cu): parameters, lengths, small device helpers.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "warp_ops.cuh"

namespace holokv {
namespace {

constexpr int MAX_WARPS = 8;
constexpr float NEG_INF = -INFINITY;

// The simt kernel reads the log-mass bias in any float dtype: converting it on the
// host would cost a kernel launch per call.
enum class Dtype : int { f32, f64, f16, bf16 };
__device__ __forceinline__ float load_float(const void* p, int64_t i, Dtype t) {
  switch (t) {
    case Dtype::f32: return static_cast<const float*>(p)[i];
    case Dtype::f64: return float(static_cast<const double*>(p)[i]);
    case Dtype::f16: return float(static_cast<const at::Half*>(p)[i]);
    default: return float(static_cast<const at::BFloat16*>(p)[i]);
  }
}
inline Dtype dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " for a side input");
  }
}

struct DecodeParams {
  const void *q, *k_slots, *v_slots, *k_tail, *v_tail;
  const void* phase;  // [k, D] in the cache dtype (the launcher converts it)
  const int64_t *slot_lens, *tail_lens;
  const int64_t* tail_start;  // ring offsets of the tails, shaped like tail_lens, or nullptr (0)
  const void* tail_bias;  // [B, Hkv, T] or nullptr
  Dtype bias_dtype;
  bool per_head;  // tail_lens and tail_start are [B, Hkv], not [B]
  float *part_o, *part_ml;  // [B, Hq, splits, D], [B, Hq, splits, 2]
  void* out;  // [B, Hq, D]: written by the split kernel itself where one block covers a row (the tensor-core
              // kernel, whose blocks merge their warps), else nullptr and the merge kernel writes it
  int Hq, Hkv, G, S, T, k, splits;
  float slot_logit_gain, tail_logit_gain, slot_value_gain;
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct SeqLens {
  int64_t n_sup, n_tail;  // superposed tokens, exact tail tokens
  bool bad;
  int n_slots, n_entries;
  int aligned_phase;  // the phase of the query's own position: aligned mode reads every slot under it
  int start;          // the tail is a ring: its entry t lives in row (start + t) mod T
  __device__ __forceinline__ int tail_row(int t, int T) const { return start + t >= T ? start + t - T : start + t; }
};

// Lengths past the tensors' capacity cannot be checked without a host sync:
// such a sequence reads nothing and gets NaN outputs rather than an out-of-bounds read.
__device__ __forceinline__ SeqLens seq_lens(const DecodeParams& p, int b, int kvh) {
  const int64_t at = p.per_head ? int64_t(b) * p.Hkv + kvh : b;
  const int64_t start = p.tail_start ? p.tail_start[at] : 0;
  SeqLens s{p.slot_lens[b], p.tail_lens[at], false, 0, 0, 0, 0};
  s.bad = s.n_sup < 0 || s.n_sup > int64_t(p.S) * p.k || s.n_tail < 0 || s.n_tail > p.T || start < 0 ||
          (start >= p.T && start != 0);
  s.n_slots = s.bad ? 0 : int((s.n_sup + p.k - 1) / p.k);
  s.n_entries = s.bad ? 0 : s.n_slots + int(s.n_tail);
  s.aligned_phase = int(((s.n_sup + s.n_tail - 1) % p.k + p.k) % p.k);
  s.start = s.bad ? 0 : int(start);
  return s;
}

}  // namespace
}  // namespace holokv
