// CUDA kernel of holokv::holo_decode (split-KV "flash decoding").
//
// Grid (splits / warps, Hkv, B), up to 4 warps a block (fewer where shared
// memory runs out: fp32, many phases and heads). Each warp owns one split: a chunk of cache
// entries (superposed slots first, then exact tail tokens) of one sequence and
// one KV head, and serves all G query heads of that KV head, so every K/V byte
// is read from HBM once. Per tile of 32 entries:
//   scores: lane = entry; the K row sits in registers and is dotted with the
//           demodulated queries q*Phi_j (shared memory) for the KP phases read;
//   values: lane = head dims; each entry's value weight per dimension is
//           sum_j p_j Phi_j[d] (+ p for an exact token), accumulated online.
// The split count fills the GPU's resident warps once (no partial last wave).
// A second kernel merges the splits' (max, sum, acc) into the output.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_pipeline.h>

#include <cmath>

#include "checks.h"

namespace holokv {
namespace {

constexpr int MAX_WARPS = 4;
constexpr float NEG_INF = -INFINITY;

// Small side inputs (phase keys, log-mass bias) come in any float dtype and are
// read in it: converting them on the host would cost a kernel launch per call.
enum class Dtype : int { f32, f64, f16, bf16 };
__device__ __forceinline__ float load_float(const void* p, int64_t i, Dtype t) {
  switch (t) {
    case Dtype::f32: return static_cast<const float*>(p)[i];
    case Dtype::f64: return float(static_cast<const double*>(p)[i]);
    case Dtype::f16: return float(static_cast<const at::Half*>(p)[i]);
    default: return float(static_cast<const at::BFloat16*>(p)[i]);
  }
}

struct DecodeParams {
  const void *q, *k_slots, *v_slots, *k_tail, *v_tail;
  const void* keys;  // [k, D]
  const int64_t *slot_lens, *tail_lens;
  const void* tail_bias;  // [B, Hkv, T] or nullptr
  Dtype keys_dtype, bias_dtype;
  float *part_o, *part_ml;  // [B, Hq, splits, D], [B, Hq, splits, 2]
  int Hq, Hkv, G, S, T, k, splits, chunk;
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

  const int64_t n_sup = p.slot_lens[b], n_tail = p.tail_lens[b];
  // Lengths past the tensors' capacity cannot be checked without a host sync:
  // such a sequence gets NaN outputs rather than an out-of-bounds read.
  const bool bad = n_sup < 0 || n_sup > int64_t(p.S) * k || n_tail < 0 || n_tail > p.T;
  const int n_slots = bad ? 0 : int((n_sup + k - 1) / k);
  const int n_entries = bad ? 0 : n_slots + int(n_tail);
  // aligned mode (KP == 1 with k > 1) reads every slot under the query's own phase
  const int j0 = KP == 1 ? int(((n_sup + n_tail - 1) % k + k) % k) : 0;

  for (int i = threadIdx.x; i < KP * D; i += blockDim.x) phis[i] = load_float(p.keys, j0 * D + i, p.keys_dtype);
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
  const int e_begin = split * p.chunk, e_end = min(n_entries, e_begin + p.chunk);

  for (int e0 = e_begin; e0 < e_end; e0 += 32) {
    const int n_tile = min(32, e_end - e0);
    // The tile's value rows go to shared memory asynchronously (coalesced,
    // all in flight at once) while the scores are computed from K.
    constexpr int CH = D * int(sizeof(T)) / 16;
    for (int i = lane; i < n_tile * CH; i += 32) {
      const int t = i / CH, c = i % CH, ee = e0 + t;
      const T* src = (ee < n_slots ? vs + int64_t(ee) * D : vt + int64_t(ee - n_slots) * D) + c * VE;
      __pipeline_memcpy_async(vtile + t * D + c * VE, src, 16);
    }
    __pipeline_commit();
    const int e = e0 + lane;
    const bool valid = e < e_end, is_slot = e < n_slots;
    // phases present in this entry: a partial last slot masks the missing ones
    const int n_ph = !valid ? 0 : !is_slot ? 1 : KP == 1 ? 1 : int(min(int64_t(k), n_sup - int64_t(e) * k));
    uint4 kr[NV];
    if (valid) {
      const uint4* src = reinterpret_cast<const uint4*>(is_slot ? ks + int64_t(e) * D : kt + int64_t(e - n_slots) * D);
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
          valid && !is_slot && p.tail_bias ? load_float(p.tail_bias, head_off * p.T + e - n_slots, p.bias_dtype) : 0.f;
      float mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        s[j] = j < n_ph ? s[j] * gain + offset : NEG_INF;
        mx = fmaxf(mx, s[j]);
      }
      const float m_old = m[h];
      const float m_new = fmaxf(m_old, warp_max(mx));
      const float alpha = __expf(m_old - m_new);  // 0 while m_old is -inf
      float psum = 0.f;
      float* pe = pw + lane * PS<KP>;
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const float pj = j < n_ph ? __expf(s[j] - m_new) : 0.f;
        psum += pj;
        pe[j] = is_slot ? pj * p.slot_value_gain : 0.f;
      }
      pe[KP] = is_slot ? 0.f : psum;
      const float tile_sum = warp_sum(psum);
      if (h == 0) __pipeline_wait_prior(0);
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

// One block per (sequence, query head): warps take interleaved splits, lanes
// take dimensions, and the warps' partial sums meet in shared memory.
constexpr int MERGE_WARPS = 32;  // many splits per row: spread their loads wide
template <typename T>
__global__ void __launch_bounds__(MERGE_WARPS * 32)
    holo_decode_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                             T* __restrict__ out, int splits, int D) {
  __shared__ float red[MERGE_WARPS][128 + 1];
  __shared__ float wmax[MERGE_WARPS];
  __shared__ int wbad[MERGE_WARPS];
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* ml = part_ml + row * splits * 2;
  float mx = NEG_INF;
  bool bad = false;
  for (int c = threadIdx.x; c < splits; c += blockDim.x) bad |= isnan(ml[2 * c]), mx = fmaxf(mx, ml[2 * c]);
  mx = warp_max(mx);
  bad = __any_sync(0xffffffffu, bad);
  if (lane == 0) wmax[warp] = mx, wbad[warp] = bad;
  __syncthreads();
  for (int w = 0; w < MERGE_WARPS; ++w) mx = fmaxf(mx, wmax[w]), bad |= wbad[w];
  float num[4] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;  // D <= 128: at most 4 dims per lane
#pragma unroll 4
  for (int c = warp; c < splits; c += MERGE_WARPS) {
    const float l = ml[2 * c + 1];
    if (l == 0.f) continue;
    const float w = __expf(ml[2 * c] - mx);
    den += l * w;
    const float* po = part_o + (row * splits + c) * D;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (lane + 32 * i < D) num[i] += po[lane + 32 * i] * w;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (lane + 32 * i < D) red[warp][lane + 32 * i] = num[i];
  if (lane == 0) red[warp][128] = den;
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float n = 0.f, dsum = 0.f;
    for (int w = 0; w < MERGE_WARPS; ++w) n += red[w][d], dsum += red[w][128];
    out[row * D + d] = T(bad ? NAN : dsum > 0.f ? n / dsum : 0.f);
  }
}

// Split-KV launch: the split count is chosen so that the blocks of all (sequence,
// KV head) rows fill the GPU's resident capacity once, each warp then streaming
// a chunk of whole 32-entry tiles; then the merge.
template <typename T, int D, int KP>
void launch(DecodeParams p, const DecodeDims& dd, at::Tensor& out, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const auto smem_bytes = [&](int warps) { return size_t(smem_floats<T, D, KP>(p.G, warps)) * sizeof(float); };
  int warps = MAX_WARPS;
  while (warps > 1 && smem_bytes(warps) > prop->sharedMemPerBlockOptin) warps /= 2;
  const size_t smem = smem_bytes(warps);
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, "holo_decode: ", p.G, " query heads per KV head with ", KP,
              " phases need ", smem, " bytes of shared memory; this GPU offers ", prop->sharedMemPerBlockOptin);
  auto kernel = holo_decode_split_kernel<T, D, KP>;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem));
  const int64_t rows = dd.B * dd.Hkv, capacity = dd.S + dd.T;
  const int64_t blocks_per_row = std::max<int64_t>(1, int64_t(prop->multiProcessorCount) * std::max(per_sm, 1) / rows);
  const int64_t chunk = 32 * ceil_div(ceil_div(capacity, blocks_per_row * warps), 32);
  p.splits = int(ceil_div(capacity, chunk));
  p.chunk = int(chunk);
  at::Tensor part_o = at::empty({dd.B, dd.Hq, p.splits, dd.D}, out.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({dd.B, dd.Hq, p.splits, 2}, out.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  dim3 grid(unsigned(ceil_div(p.splits, warps)), unsigned(dd.Hkv), unsigned(dd.B));
  kernel<<<grid, warps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  holo_decode_merge_kernel<T><<<unsigned(dd.B * dd.Hq), MERGE_WARPS * 32, 0, stream>>>(
      p.part_o, p.part_ml, out.data_ptr<T>(), p.splits, int(dd.D));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_phases(const DecodeParams& p, const DecodeDims& dd, int kp, at::Tensor& out, cudaStream_t stream) {
  switch (kp) {
    case 1: return launch<T, D, 1>(p, dd, out, stream);
    case 2: return launch<T, D, 2>(p, dd, out, stream);
    case 4: return launch<T, D, 4>(p, dd, out, stream);
    case 8: return launch<T, D, 8>(p, dd, out, stream);
    case 16: return launch<T, D, 16>(p, dd, out, stream);
    default: TORCH_CHECK(false, "holo_decode: no kernel for ", kp, " phases");
  }
}

Dtype dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "holo_decode: unsupported dtype ", t.scalar_type());
  }
}

}  // namespace

at::Tensor holo_decode_cuda(const at::Tensor& q, const at::Tensor& k_slots, const at::Tensor& v_slots,
                            const at::Tensor& keys, const at::Tensor& slot_lens, const at::Tensor& k_tail,
                            const at::Tensor& v_tail, const at::Tensor& tail_lens, c10::string_view mode,
                            std::optional<double> scale, double slot_gain,
                            const std::optional<at::Tensor>& tail_bias) {
  const DecodeDims dd = check_holo_decode(q, k_slots, v_slots, keys, slot_lens, k_tail, v_tail, tail_lens,
                                          std::string(mode), tail_bias);
  TORCH_CHECK(dd.D == 64 || dd.D == 128, "CUDA holo_decode supports head_dim 64 and 128, got ", dd.D);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "CUDA holo_decode supports float16, bfloat16 and float32 q, got ", dtype);
  for (auto [t, name] : {std::pair{&k_slots, "k_slots"}, std::pair{&v_slots, "v_slots"}, std::pair{&k_tail, "k_tail"},
                         std::pair{&v_tail, "v_tail"}})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name,
                " must start on a 16-byte boundary (it is read in vector loads); a sliced view may not");
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  if (dd.S + dd.T == 0) return out.zero_();

  DecodeParams p{q.data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), k_tail.data_ptr(), v_tail.data_ptr(),
                 keys.data_ptr(), slot_lens.data_ptr<int64_t>(), tail_lens.data_ptr<int64_t>(),
                 tail_bias ? tail_bias->data_ptr() : nullptr, dtype_code(keys),
                 tail_bias ? dtype_code(*tail_bias) : Dtype::f32, nullptr, nullptr, int(dd.Hq), int(dd.Hkv),
                 int(dd.G), int(dd.S), int(dd.T), int(dd.k), 0, 0, 0.f, 0.f, 0.f};
  const double sc = scale.value_or(1.0 / std::sqrt(double(dd.D)));
  p.slot_logit_gain = float(sc * slot_gain);
  p.tail_logit_gain = float(sc);
  p.slot_value_gain = float(std::sqrt(double(dd.k)));
  const int kp = dd.aligned ? 1 : int(dd.k);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (dd.D == 64)
      launch_phases<scalar_t, 64>(p, dd, kp, out, stream);
    else
      launch_phases<scalar_t, 128>(p, dd, kp, out, stream);
  };
  if (dtype == at::kHalf)
    run(at::Half{});
  else if (dtype == at::kBFloat16)
    run(at::BFloat16{});
  else
    run(float{});
  return out;
}

TORCH_LIBRARY_IMPL(holokv, CUDA, m) { m.impl("holo_decode", &holo_decode_cuda); }

}  // namespace holokv
