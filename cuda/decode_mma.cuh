// Tensor-core split kernel of holo_decode for one score per entry (KP == 1:
// aligned mode, k = 1, SRC's compacted cache), 16-bit caches, G <= 16 query
// heads per KV head.
//
// A warp owns one split, an even share of its row's entries (counted on the device,
// so the shares follow the lengths, not the capacity). Its tiles of 32 entries (K and
// V rows, 16-byte chunks XOR-swizzled so that ldmatrix reads are conflict-free)
// stream into shared memory with cp.async, double-buffered, so the next tile is
// in flight while one is computed. Per tile, with the G heads as the 16 rows of
// mma.m16n8k16 (rows past G are zero):
//   scores S[16 x 32] = Q Kᵀ: Q's fragments live in registers for the whole
//           split (demodulated by the aligned phase for slots; ±1 keeps it exact);
//   online softmax on S's accumulator fragments (rows shared by a lane quad);
//   O[16 x D] += P V: P's accumulator layout is the A-operand layout of the
//           next mma, V's fragments come from ldmatrix.trans.
// Slots precede exact tokens in every split, and a slot's value weight per
// dimension is p·sqrt(k)·Phi[d]: O is scaled by sqrt(k)·Phi column-wise once, when
// the slots end. An exact entry's log-mass bias is loaded one tile ahead, one entry
// per lane, and handed to the lanes that need it through shared memory. P is rounded
// to the cache dtype for its mma, as flash attention does.
//
// At the end the block's warps merge their (max, sum, O) in shared memory: a block
// that covers its row writes the output itself, otherwise its partial goes to the
// merge kernel (one per block, not one per warp).
#pragma once
#include <climits>
#include <type_traits>

#include "decode_common.cuh"
#include "warp_ops.cuh"

namespace holokv {
namespace {

constexpr int MMA_STAGES = 2;
template <typename T, int D>
constexpr int mma_warp_bytes() { return MMA_STAGES * 2 * 32 * D * int(sizeof(T)) + 32 * int(sizeof(float)); }

template <typename T, int D>
__global__ void __launch_bounds__(MAX_WARPS * 32) holo_decode_mma_kernel(DecodeParams p) {
  constexpr int NC = D / 8;   // 16-byte chunks per row
  constexpr int NK = D / 16;  // k-steps of Q Kᵀ
  constexpr int NN = D / 8;   // n-tiles of P V
  constexpr int WARP_FLOATS = mma_warp_bytes<T, D>() / int(sizeof(float));
  extern __shared__ float4 smem4[];
  const int b = blockIdx.z, kvh = blockIdx.y, G = p.G;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* region = reinterpret_cast<float*>(smem4) + warp * WARP_FLOATS;
  T* tiles = reinterpret_cast<T*>(region);                                  // [stage][K, V][32][D]
  float* tile_bias = reinterpret_cast<float*>(tiles + MMA_STAGES * 2 * 32 * D);  // [32]

  const SeqLens sl = seq_lens(p, b, kvh);
  const int j0 = sl.aligned_phase;
  const int64_t head_off = int64_t(b) * p.Hkv + kvh;
  const T* ks = static_cast<const T*>(p.k_slots) + head_off * p.S * D;
  const T* vs = static_cast<const T*>(p.v_slots) + head_off * p.S * D;
  const T* kt = static_cast<const T*>(p.k_tail) + head_off * p.T * D;
  const T* vt = static_cast<const T*>(p.v_tail) + head_off * p.T * D;
  // the row's entries in even shares over all its blocks' warps
  const int parts = int(gridDim.x) * warps, chunk = (sl.n_entries + parts - 1) / parts;
  const int e_begin = min(sl.n_entries, (int(blockIdx.x) * warps + warp) * chunk);
  const int e_end = min(sl.n_entries, e_begin + chunk);
  const int n_slots = sl.n_slots;
  const bool has_slots = e_begin < min(n_slots, e_end);

  // Tiles never straddle the slot/exact boundary: [e0, tile_end(e0)).
  const auto tile_end = [&](int e0) { return min(e0 + 32, e0 < n_slots ? min(n_slots, e_end) : e_end); };
  // A lane copies the same 16-byte column of rows lr, lr + RPP, ...: a tile's rows are consecutive in the
  // slots, or in the tail's ring up to its wrap, so each copy costs an add and a compare. (An address computed
  // per entry costs more instructions than the rest of the tile together, with few warps to hide them.)
  constexpr int RPP = 32 / NC;  // rows a pass of the warp covers
  const int lc = lane % NC, lr = lane / NC;
  const auto load_tile = [&](int e0, int st) {
    T* kd = tiles + st * 2 * 32 * D;
    const bool slot = e0 < n_slots;
    const T *kb = slot ? ks : kt, *vb = slot ? vs : vt;
    const int first = slot ? e0 : sl.tail_row(e0 - n_slots, p.T), wrap = slot ? INT_MAX : p.T;
    const int n = tile_end(e0) - e0;
#pragma unroll
    for (int it = 0; it < NC; ++it) {
      const int t = lr + RPP * it, r = first + t;
      const bool ok = t < n;
      const int64_t off = ok ? int64_t(r >= wrap ? r - wrap : r) * D + lc * 8 : 0;
      const int dst = t * D + (lc ^ (t & 7)) * 8;
      cp_async16(kd + dst, kb + off, ok);
      cp_async16(kd + 32 * D + dst, vb + off, ok);
    }
    cp_async_commit();
  };
  // Entry e0 + lane's additive logit, loaded a tile ahead as a raw element of T (the launcher
  // converts tail_bias to T): nothing may wait on the load before the next tile uses it, so
  // the address is clamped instead of the load being skipped, and the value is checked,
  // converted and handed to the lanes that need it (through shared memory) only then.
  const T* bias_src = static_cast<const T*>(p.tail_bias ? p.tail_bias : p.q);  // q: any valid address
  const auto load_bias = [&](int e0) {
    const int e = e0 + lane;
    return bias_src[p.tail_bias && e >= n_slots && e < e_end ? head_off * p.T + sl.tail_row(e - n_slots, p.T) : 0];
  };
  // the first tile is in flight while the query is read
  T bias0 = load_bias(e_begin), bias1 = bias0;
  if (e_begin < e_end) load_tile(e_begin, 0);

  // Query fragments (A operand: rows = heads, lane holds rows r0, r0 + 8 and
  // columns c0, c0 + 1 of each 8-column half of a k-step), read as pairs (the
  // launcher aligns q and the phase keys, in T, to 4 bytes).
  const int r0 = lane / 4, r1 = r0 + 8, c0 = (lane % 4) * 2;
  const uint32_t* q2 =
      reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.q) + (int64_t(b) * p.Hq + int64_t(kvh) * G) * D);
  const uint32_t* phase2 = reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.phase) + int64_t(j0) * D);
  uint32_t qa[NK][4], qs[NK][4];
#pragma unroll
  for (int s = 0; s < NK; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i % 2 ? r1 : r0, d = 16 * s + (i / 2) * 8 + c0;
      qa[s][i] = r < G ? q2[(r * D + d) / 2] : 0u;
      const float2 x = unpack2<T>(qa[s][i]), f = has_slots ? unpack2<T>(phase2[d / 2]) : make_float2(0.f, 0.f);
      qs[s][i] = pack2<T>(x.x * f.x, x.y * f.y);
    }

  float o[NN][4];
#pragma unroll
  for (int n = 0; n < NN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // rows r0, r1; l is this lane's share
  bool folded = !has_slots;
  // O's slot part gets its per-dimension value weight sqrt(k)·Phi[d] (rows scale alike)
  const auto fold_phase = [&]() {
#pragma unroll
    for (int n = 0; n < NN; ++n) {
      const float2 f = unpack2<T>(phase2[(8 * n + c0) / 2]);
      const float w0 = p.slot_value_gain * f.x, w1 = p.slot_value_gain * f.y;
      o[n][0] *= w0, o[n][2] *= w0, o[n][1] *= w1, o[n][3] *= w1;
    }
    folded = true;
  };

  // One tile in stage st: this tile's lane bias is `bias`, the next tile's goes to `bias_next`.
  const auto step = [&](int& e0, const int st, const T bias, T& bias_next) {
    const int e1 = tile_end(e0);
    const bool slot = e0 < n_slots;
    if (!slot && !folded) fold_phase();
    bias_next = load_bias(e1);
    if (e1 < e_end) {
      load_tile(e1, st ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    tile_bias[lane] = p.tail_bias && e0 + lane >= n_slots && e0 + lane < e1 ? float(bias) : 0.f;
    __syncwarp();  // every lane's copies of this tile (and its biases) have landed
    const T* ktile = tiles + st * 2 * 32 * D;
    const T* vtile = ktile + 32 * D;

    float sc[4][4];
    const auto scores = [&](const uint32_t (&qf)[NK][4]) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
        for (int s = 0; s < NK; s += 2) {
          // matrices: rows 8j.. of chunks 2s, 2s+1 (k-step s), 2s+2, 2s+3 (k-step s+1)
          const int row = 8 * j + lane % 8, c = 2 * s + lane / 8;
          uint32_t kb[4];
          ldmatrix_x4<false>(kb, ktile + row * D + (c ^ (row & 7)) * 8);
          mma16816<T>(sc[j], qf[s], kb[0], kb[1]);
          mma16816<T>(sc[j], qf[s + 1], kb[2], kb[3]);
        }
      }
    };
    if (slot)  // two inlined copies: register arrays cannot be picked at run time
      scores(qs);
    else
      scores(qa);
    const float gain = slot ? p.slot_logit_gain : p.tail_logit_gain;
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool ok = e0 + 8 * j + c0 + i % 2 < e1;
        sc[j][i] = ok ? sc[j][i] * gain + tile_bias[8 * j + c0 + i % 2] : NEG_INF;
        mx[i / 2] = fmaxf(mx[i / 2], sc[j][i]);
      }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      base[r] = m_new == NEG_INF ? 0.f : m_new;  // a row with nothing seen yet stays all zeros
      alpha[r] = __expf(m[r] - base[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sc[j][i] = __expf(sc[j][i] - base[i / 2]);
        l[i / 2] += sc[j][i];
      }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))  // past the first tiles the max rarely moves
#pragma unroll
      for (int n = 0; n < NN; ++n) o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const uint32_t pa[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                              pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < NN; n += 2) {
        // matrices: entries 16kk.., 16kk+8.. of chunk n, then of chunk n+1
        const int row = 16 * kk + (lane / 8) % 2 * 8 + lane % 8, c = n + lane / 16;
        uint32_t vb[4];
        ldmatrix_x4<true>(vb, vtile + row * D + (c ^ (row & 7)) * 8);
        mma16816<T>(o[n], pa, vb[0], vb[1]);
        mma16816<T>(o[n + 1], pa, vb[2], vb[3]);
      }
    }
    __syncwarp();  // all lanes are done with this stage before it is refilled
    e0 = e1;
  };
  // Unrolled by the two stages, so that the prefetched bias is never moved between
  // registers: a move would wait for its load, one memory latency per tile.
  int e0 = e_begin;
  while (e0 < e_end) {
    step(e0, 0, bias0, bias1);
    if (e0 < e_end) step(e0, 1, bias1, bias0);
  }
  if (!folded) fold_phase();

  // The block's merge. Each warp leaves its O rows [G][D] and (max, sum) per head in its own region (its
  // tiles are no longer read); a NaN max marks lengths past the capacity.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int h = r ? r1 : r0;
    if (h >= G) continue;
#pragma unroll
    for (int n = 0; n < NN; ++n)
      *reinterpret_cast<float2*>(region + h * D + 8 * n + c0) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
    if (c0 == 0) tile_bias[2 * h] = sl.bad ? NAN : m[r], tile_bias[2 * h + 1] = l[r];
  }
  __syncthreads();
  // As the merge kernel does: a NaN or +inf logit leaves a NaN sum, and fmaxf skips NaNs, so they are looked
  // for apart; a block that saw nothing is (max -inf, sum 0).
  const float* regions = reinterpret_cast<const float*>(smem4);
  const int ml_at = MMA_STAGES * 2 * 32 * D * int(sizeof(T)) / int(sizeof(float));
  const int64_t head0 = int64_t(b) * p.Hq + int64_t(kvh) * G;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int h = i / D, d = i % D;
    float mx = NEG_INF, num = 0.f, den = 0.f;
    bool bad = false;
    for (int w = 0; w < warps; ++w) {
      const float* ml = regions + w * WARP_FLOATS + ml_at + 2 * h;
      bad |= isnan(ml[0]) || isnan(ml[1]);
      mx = fmaxf(mx, ml[0]);
    }
    if (mx != NEG_INF)
      for (int w = 0; w < warps; ++w) {
        const float* ml = regions + w * WARP_FLOATS + ml_at + 2 * h;
        const float wt = __expf(ml[0] - mx);
        den += ml[1] * wt, num += regions[w * WARP_FLOATS + i] * wt;
      }
    if (p.out) {
      static_cast<T*>(p.out)[(head0 + h) * D + d] = T(bad ? NAN : mx == NEG_INF ? 0.f : num / den);
    } else {
      const int64_t row = (head0 + h) * p.splits + blockIdx.x;
      p.part_o[row * D + d] = num;
      if (d == 0) p.part_ml[row * 2] = bad ? NAN : mx, p.part_ml[row * 2 + 1] = den;
    }
  }
}

}  // namespace
}  // namespace holokv
