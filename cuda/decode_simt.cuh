// CUDA-core split kernel of holo_decode: every phase count KP (full and aligned
// modes), every dtype. Each warp owns one split: an even share of the cache entries
// (superposed slots first, then exact tail tokens) of one sequence and one KV
// head, and serves all G query heads of that KV head, so every K/V byte is read
// from HBM once. Per tile of 32 entries:
//   scores: lane = entry; the K row sits in registers and is dotted with the
//           demodulated queries q*Phi_j (shared memory) for the KP phases read;
//   values: lane = head dims; each entry's value weight per dimension is
//           sum_j p_j Phi_j[d] (+ p for an exact token), accumulated online.
#pragma once
#include "decode_common.cuh"

namespace holokv {
namespace {

// Shared-memory floats: phase table, demodulated queries, then per warp its
// accumulators acc[G][D], running max m[G], running sum l[G], the tile's
// per-entry weights p[32][PS] (column KP: weight of an exact token) and
// the tile's value rows v[32][D]. Every region starts on 16 bytes (float4 reads,
// cp.async).
__host__ __device__ constexpr int round4(int n) { return (n + 3) / 4 * 4; }
template <int KP>
constexpr int PS = round4(KP + 1);
template <typename T, int D, int KP>
__host__ __device__ constexpr int warp_floats(int G) {
  return G * D + round4(2 * G) + 32 * PS<KP> + 32 * D * int(sizeof(T)) / 4;
}
template <typename T, int D, int KP>
__host__ __device__ constexpr int smem_floats(int G, int warps) {
  return KP * D + G * (KP + 1) * D + warps * warp_floats<T, D, KP>(G);
}

// DPL consecutive elements of a value row, loaded in one access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int D, int KP>
__global__ void __launch_bounds__(MAX_WARPS * 32) holo_decode_split_kernel(DecodeParams p) {
  constexpr int VE = 16 / sizeof(T);  // elements per 16-byte load
  constexpr int NV = D / VE;          // 16-byte loads per row
  constexpr int DPL = D / 32;         // dims per lane in the value pass
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int b = blockIdx.z, kvh = blockIdx.y, G = p.G, k = p.k;
  float* phis = smem;                  // [KP][D]
  float* qt = phis + KP * D;           // [G][KP + 1][D]: q * Phi_j, then q
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* acc = qt + G * (KP + 1) * D + warp * warp_floats<T, D, KP>(G);
  float* m = acc + G * D;
  float* l = m + G;
  float* pw = m + round4(2 * G);
  T* vtile = reinterpret_cast<T*>(pw + 32 * PS<KP>);

  const SeqLens sl = seq_lens(p, b, kvh);
  const int64_t n_sup = sl.n_sup;
  const bool bad = sl.bad;
  const int n_slots = sl.n_slots, n_entries = sl.n_entries;
  const int j0 = KP == 1 ? sl.aligned_phase : 0;  // full mode reads all k phases

  for (int i = threadIdx.x; i < KP * D; i += blockDim.x) phis[i] = float(static_cast<const T*>(p.phase)[j0 * D + i]);
  __syncthreads();
  const T* q = static_cast<const T*>(p.q) + (int64_t(b) * p.Hq + int64_t(kvh) * G) * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int h = i / D, d = i % D;
    const float qv = float(q[i]);
#pragma unroll
    for (int j = 0; j < KP; ++j) qt[(h * (KP + 1) + j) * D + d] = qv * phis[j * D + d];
    qt[(h * (KP + 1) + KP) * D + d] = qv;
  }
  for (int i = lane; i < G * D; i += 32) acc[i] = 0.f;
  for (int h = lane; h < G; h += 32) m[h] = NEG_INF, l[h] = 0.f;
  __syncthreads();
  // this lane's dims of the phase table, kept in registers when they fit
  constexpr bool PH_REGS = KP * DPL <= 32;
  float ph[PH_REGS ? KP : 1][DPL];
  if constexpr (PH_REGS) {
#pragma unroll
    for (int j = 0; j < KP; ++j)
#pragma unroll
      for (int i = 0; i < DPL; ++i) ph[j][i] = phis[j * D + lane * DPL + i];
  }

  const int split = blockIdx.x * (blockDim.x / 32) + warp;
  if (split >= p.splits) return;
  const int64_t head_off = int64_t(b) * p.Hkv + kvh;
  const T* ks = static_cast<const T*>(p.k_slots) + head_off * p.S * D;
  const T* vs = static_cast<const T*>(p.v_slots) + head_off * p.S * D;
  const T* kt = static_cast<const T*>(p.k_tail) + head_off * p.T * D;
  const T* vt = static_cast<const T*>(p.v_tail) + head_off * p.T * D;
  const int chunk = (n_entries + p.splits - 1) / p.splits;  // even shares of the row's entries
  const int e_begin = min(n_entries, split * chunk), e_end = min(n_entries, e_begin + chunk);

  for (int e0 = e_begin; e0 < e_end; e0 += 32) {
    const int n_tile = min(32, e_end - e0);
    // The tile's value rows go to shared memory asynchronously (coalesced,
    // all in flight at once) while the scores are computed from K.
    constexpr int CH = D * int(sizeof(T)) / 16;
    for (int i = lane; i < n_tile * CH; i += 32) {
      const int t = i / CH, c = i % CH, ee = e0 + t;
      const T* src = (ee < n_slots ? vs + int64_t(ee) * D : vt + int64_t(sl.tail_row(ee - n_slots, p.T)) * D) + c * VE;
      cp_async16(vtile + t * D + c * VE, src, true);
    }
    cp_async_commit();
    const int e = e0 + lane;
    const bool valid = e < e_end, is_slot = e < n_slots;
    // phases present in this entry: a partial last slot masks the missing ones
    const int n_ph = !valid ? 0 : !is_slot ? 1 : KP == 1 ? 1 : int(min(int64_t(k), n_sup - int64_t(e) * k));
    uint4 kr[NV];
    if (valid) {
      const uint4* src =
          reinterpret_cast<const uint4*>(is_slot ? ks + int64_t(e) * D : kt + int64_t(sl.tail_row(e - n_slots, p.T)) * D);
#pragma unroll
      for (int c = 0; c < NV; ++c) kr[c] = src[c];
    }
    for (int h = 0; h < G; ++h) {
      float s[KP];
      const float* qh = qt + h * (KP + 1) * D;
#pragma unroll
      for (int j = 0; j < KP; ++j) s[j] = 0.f;
      if (valid) {
#pragma unroll
        for (int c = 0; c < NV; ++c) {
          const T* kv = reinterpret_cast<const T*>(&kr[c]);
#pragma unroll
          for (int i = 0; i < VE; i += 4) {
            const float k0 = float(kv[i]), k1 = float(kv[i + 1]), k2 = float(kv[i + 2]), k3 = float(kv[i + 3]);
            if (is_slot) {
#pragma unroll
              for (int j = 0; j < KP; ++j) {
                const float4 qv = *reinterpret_cast<const float4*>(qh + j * D + c * VE + i);
                s[j] += qv.x * k0 + qv.y * k1 + qv.z * k2 + qv.w * k3;
              }
            } else {
              const float4 qv = *reinterpret_cast<const float4*>(qh + KP * D + c * VE + i);
              s[0] += qv.x * k0 + qv.y * k1 + qv.z * k2 + qv.w * k3;
            }
          }
        }
      }
      const float gain = is_slot ? p.slot_logit_gain : p.tail_logit_gain;
      const float offset =
          valid && !is_slot && p.tail_bias
              ? load_float(p.tail_bias, head_off * p.T + sl.tail_row(e - n_slots, p.T), p.bias_dtype)
              : 0.f;
      float mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        s[j] = j < n_ph ? s[j] * gain + offset : NEG_INF;
        mx = fmaxf(mx, s[j]);
      }
      const float m_old = m[h];
      const float m_new = fmaxf(m_old, warp_max(mx));
      const float base = m_new == NEG_INF ? 0.f : m_new;  // nothing unmasked yet: weights stay 0, not NaN
      const float alpha = __expf(m_old - base);  // 0 while m_old is -inf
      float psum = 0.f;
      float* pe = pw + lane * PS<KP>;
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const float pj = j < n_ph ? __expf(s[j] - base) : 0.f;
        psum += pj;
        pe[j] = is_slot ? pj * p.slot_value_gain : 0.f;
      }
      pe[KP] = is_slot ? 0.f : psum;
      const float tile_sum = warp_sum(psum);
      if (h == 0) cp_async_wait<0>();
      __syncwarp();
      if (lane == 0) m[h] = m_new, l[h] = l[h] * alpha + tile_sum;

      float a[DPL];
      float* acc_h = acc + h * D + lane * DPL;
#pragma unroll
      for (int i = 0; i < DPL; ++i) a[i] = acc_h[i] * alpha;
#pragma unroll 8
      for (int t = 0; t < n_tile; ++t) {
        const Pack<T, DPL> v = *reinterpret_cast<const Pack<T, DPL>*>(vtile + t * D + lane * DPL);
        const float* pt = pw + t * PS<KP>;
        float pj[PS<KP>];
#pragma unroll
        for (int j = 0; j < PS<KP>; j += 4) *reinterpret_cast<float4*>(pj + j) = *reinterpret_cast<const float4*>(pt + j);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          float w = pj[KP];
#pragma unroll
          for (int j = 0; j < KP; ++j) w += pj[j] * (PH_REGS ? ph[PH_REGS ? j : 0][i] : phis[j * D + lane * DPL + i]);
          a[i] += w * float(v.v[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc_h[i] = a[i];
      __syncwarp();
    }
  }
  for (int h = 0; h < G; ++h) {
    const int64_t row = (int64_t(b) * p.Hq + int64_t(kvh) * G + h) * p.splits + split;
    for (int i = lane; i < D; i += 32) p.part_o[row * D + i] = acc[h * D + i];
    if (lane == 0) p.part_ml[row * 2] = bad ? NAN : m[h], p.part_ml[row * 2 + 1] = l[h];
  }
}

}  // namespace
}  // namespace holokv
