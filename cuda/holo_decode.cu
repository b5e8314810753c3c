// CUDA implementation of holokv::holo_decode (split-KV "flash decoding").
//
// Grid (blocks a row, Hkv, B), as many warps a block as keep the most warps
// resident (see block_shape). Each warp owns a share of one (sequence, KV head)'s
// entries and serves all G query heads of that KV head, so every K/V byte is read
// from HBM once. The blocks fill the GPU's resident warps once (no partial last
// wave); the kernels share each row's entries evenly over its warps from the
// lengths on the device. Two split kernels:
//   decode_mma.cuh   tensor cores, one score per entry (aligned mode, k = 1, SRC's
//                    compacted cache), 16-bit caches, G <= 16;
//   decode_simt.cuh  CUDA cores, everything else (full mode's k scores per slot, fp32).
// A second kernel merges the splits' (max, sum, acc) into the output, unless the
// tensor-core kernel's blocks, which merge their warps, cover a row each.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "decode_mma.cuh"
#include "decode_simt.cuh"

namespace holokv {
namespace {

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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const float* ml = part_ml + row * splits * 2;
  // A NaN or +inf logit leaves its split a NaN sum (its weight is exp(inf - inf) or exp(NaN)), lengths past
  // the capacity a NaN max: the row is NaN. fmaxf skips NaNs, so they are looked for apart.
  float mx = NEG_INF;
  bool bad = false;
  for (int c = threadIdx.x; c < splits; c += blockDim.x)
    bad |= isnan(ml[2 * c]) || isnan(ml[2 * c + 1]), mx = fmaxf(mx, ml[2 * c]);
  mx = warp_max(mx);
  bad = __any_sync(0xffffffffu, bad);
  if (lane == 0) wmax[warp] = mx, wbad[warp] = bad;
  __syncthreads();
  for (int w = 0; w < warps; ++w) mx = fmaxf(mx, wmax[w]), bad |= wbad[w];
  float num[4] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;  // D <= 128: at most 4 dims per lane
#pragma unroll 4
  for (int c = warp; c < splits; c += warps) {  // splits with nothing unmasked weigh 0
    const float w = __expf(ml[2 * c] - mx);
    den += ml[2 * c + 1] * w;
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
    for (int w = 0; w < warps; ++w) n += red[w][d], dsum += red[w][128];
    out[row * D + d] = T(bad ? NAN : mx == NEG_INF ? 0.f : n / dsum);  // every logit -inf, or none: zeros
  }
}

// Warps per block of `kernel` (shared memory `warp_bytes(warps)` a block) and its resident blocks per SM: the
// count that keeps the most warps resident on an SM, ties to the smaller block. Each warp streams a split of its
// own, so resident warps are the tiles in flight that hide HBM latency (with 32 KB a warp, 4-warp blocks leave
// room for one block, 7 warps fill an SM). Found once per kernel, shared-memory size and device.
template <typename Kernel, typename SmemBytes>
std::pair<int, int> block_shape(Kernel kernel, SmemBytes smem_bytes, int G) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, size_t, int>, std::pair<int, int>> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), smem_bytes(1), int(at::cuda::current_device()));
  if (auto it = known.find(key); it != known.end()) return it->second;
  TORCH_CHECK(smem_bytes(1) <= prop->sharedMemPerBlockOptin, "holo_decode: ", G, " query heads per KV head need ",
              smem_bytes(1), " bytes of shared memory; this GPU offers ", prop->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(prop->sharedMemPerBlockOptin)));
  std::pair<int, int> best{1, 1};
  for (int warps = 1, most = 0; warps <= MAX_WARPS && smem_bytes(warps) <= prop->sharedMemPerBlockOptin; ++warps) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem_bytes(warps)));
    if (per_sm * warps > most) most = per_sm * warps, best = {warps, per_sm};
  }
  return known[key] = best;
}

// Split-KV launch of `kernel` with `smem_bytes(warps)` of shared memory per block (block_shape's warps), enough
// blocks to fill the GPU's resident ones once, no more than the capacity's 32-entry tiles need; then the merge.
// A split is a block's warps merged in the block (`block_merge`: a block that covers its row writes the output
// and no merge runs) or a single warp. The kernels share each row's entries evenly over its warps themselves.
template <typename T, typename Kernel, typename SmemBytes>
void launch_split(Kernel kernel, SmemBytes smem_bytes, bool block_merge, DecodeParams p, const DecodeDims& dd,
                  at::Tensor& out, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const auto [warps, per_sm] = block_shape(kernel, smem_bytes, int(dd.G));
  const size_t smem = smem_bytes(warps);
  const int64_t rows = dd.B * dd.Hkv, tiles = ceil_div(dd.S + dd.T, 32);
  const int64_t blocks = std::clamp<int64_t>(int64_t(prop->multiProcessorCount) * per_sm / rows, 1,
                                             ceil_div(tiles, warps));
  p.splits = int(block_merge ? blocks : std::min(blocks * warps, tiles));
  at::Tensor part_o, part_ml;
  if (block_merge && blocks == 1) {
    p.out = out.data_ptr();
  } else {
    part_o = at::empty({dd.B, dd.Hq, p.splits, dd.D}, out.options().dtype(at::kFloat));
    part_ml = at::empty({dd.B, dd.Hq, p.splits, 2}, out.options().dtype(at::kFloat));
    p.part_o = part_o.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }
  dim3 grid(unsigned(block_merge ? blocks : ceil_div(p.splits, warps)), unsigned(dd.Hkv), unsigned(dd.B));
  kernel<<<grid, warps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.out) return;
  // a warp a split, up to MERGE_WARPS: few splits (large batches) need no 1024-thread blocks
  const int merge_warps = int(std::min<int64_t>(MERGE_WARPS, p.splits));
  holo_decode_merge_kernel<T><<<unsigned(dd.B * dd.Hq), merge_warps * 32, 0, stream>>>(
      p.part_o, p.part_ml, out.data_ptr<T>(), p.splits, int(dd.D));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D, int KP>
void launch_simt(const DecodeParams& p, const DecodeDims& dd, at::Tensor& out, cudaStream_t stream) {
  launch_split<T>(holo_decode_split_kernel<T, D, KP>,
                  [&](int warps) { return size_t(smem_floats<T, D, KP>(p.G, warps)) * sizeof(float); }, false, p,
                  dd, out, stream);
}

// The tensor-core kernel serves one score per entry, 16-bit caches, G <= 16.
bool use_mma(at::ScalarType dtype, int kp, int64_t G) { return dtype != at::kFloat && kp == 1 && G <= 16; }

template <typename T, int D>
void launch_phases(const DecodeParams& p, const DecodeDims& dd, int kp, at::Tensor& out, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma(out.scalar_type(), kp, dd.G))
      return launch_split<T>(holo_decode_mma_kernel<T, D>, [](int warps) { return size_t(warps) * mma_warp_bytes<T, D>(); },
                             true, p, dd, out, stream);
  }
  switch (kp) {
    case 1: return launch_simt<T, D, 1>(p, dd, out, stream);
    case 2: return launch_simt<T, D, 2>(p, dd, out, stream);
    case 4: return launch_simt<T, D, 4>(p, dd, out, stream);
    case 8: return launch_simt<T, D, 8>(p, dd, out, stream);
    case 16: return launch_simt<T, D, 16>(p, dd, out, stream);
    default: TORCH_CHECK(false, "holo_decode: no kernel for ", kp, " phases");
  }
}

}  // namespace

at::Tensor holo_decode_cuda(const at::Tensor& q, const at::Tensor& k_slots, const at::Tensor& v_slots,
                            const at::Tensor& phase, const at::Tensor& slot_lens, const at::Tensor& k_tail,
                            const at::Tensor& v_tail, const at::Tensor& tail_lens, c10::string_view mode,
                            std::optional<double> scale, double slot_gain,
                            const std::optional<at::Tensor>& tail_bias, const std::optional<at::Tensor>& tail_start) {
  const DecodeDims dd = check_holo_decode(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens,
                                          std::string(mode), tail_bias, tail_start);
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

  const int kp = dd.aligned ? 1 : int(dd.k);
  // The kernels read the phase keys as T and the tensor-core one the bias too (no-ops where the cache stores
  // them so), q and the phase keys in 32-bit pairs: a view off 4-byte alignment is copied.
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 ? t.clone() : t; };
  const at::Tensor qq = aligned(q), phase_t = aligned(phase.to(dtype));
  const at::Tensor bias = !tail_bias ? at::Tensor() : use_mma(dtype, kp, dd.G) ? tail_bias->to(dtype) : *tail_bias;
  DecodeParams p{qq.data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), k_tail.data_ptr(), v_tail.data_ptr(),
                 phase_t.data_ptr(), slot_lens.data_ptr<int64_t>(), tail_lens.data_ptr<int64_t>(),
                 tail_start ? tail_start->data_ptr<int64_t>() : nullptr, bias.defined() ? bias.data_ptr() : nullptr,
                 bias.defined() ? dtype_code(bias) : Dtype::f32, dd.per_head, nullptr, nullptr, nullptr,
                 int(dd.Hq), int(dd.Hkv), int(dd.G), int(dd.S), int(dd.T), int(dd.k), 0, 0.f, 0.f, 0.f};
  const double sc = scale.value_or(1.0 / std::sqrt(double(dd.D)));
  p.slot_logit_gain = float(sc * slot_gain);
  p.tail_logit_gain = float(sc);
  p.slot_value_gain = float(std::sqrt(double(dd.k)));
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
