// Argument validation shared by the CPU and CUDA kernels: every bad input gets
// a TORCH_CHECK that names the argument, before any kernel touches memory.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>

namespace holokv {

inline bool is_pow2_upto16(int64_t k) { return k == 1 || k == 2 || k == 4 || k == 8 || k == 16; }

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// The phase keys [k, head_dim] of a superposed cache (holokv.phase_keys).
inline void check_phase(const at::Tensor& phase, const at::Tensor& x, const char* x_name) {
  check_float_tensor(phase, "phase");
  check_same_device(phase, x, "phase", x_name);
  TORCH_CHECK(phase.dim() == 2, "phase must be [k, head_dim], got ", phase.sizes());
  TORCH_CHECK(is_pow2_upto16(phase.size(0)), "phase.size(0) = k must be a power of two in {1,2,4,8,16}, got ",
              phase.size(0));
  TORCH_CHECK(phase.size(1) == x.size(-1), "phase.size(1) = ", phase.size(1), " must equal ", x_name,
              ".size(-1) = head_dim = ", x.size(-1));
}

// x [B, H, N, d], phase [k, d]; returns nothing, throws on bad input.
inline void check_superpose(const at::Tensor& x, const at::Tensor& phase) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be [B, H, N, head_dim], got ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, "x: head_dim must be even, got ", x.size(3));
  check_phase(phase, x, "x");
}

// int64 lengths or offsets on `ref`'s device, [B] or, where per_head_ok, [B, Hkv].
inline bool check_lens(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, int64_t B,
                       int64_t Hkv, bool per_head_ok) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  const bool per_head = per_head_ok && t.dim() == 2;
  TORCH_CHECK((t.dim() == 1 && t.size(0) == B) || (per_head && t.size(0) == B && t.size(1) == Hkv), name,
              " must be [B] = [", B, "]", per_head_ok ? " or [B, Hkv]" : "", ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(t, ref, name, ref_name);
  return per_head;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An additive logit per exact tail token, [B, Hkv, T] (SRC centroids carry log-masses).
inline void check_tail_bias(const std::optional<at::Tensor>& tail_bias, const at::Tensor& k_tail) {
  if (!tail_bias) return;
  const at::Tensor& t = *tail_bias;
  check_float_tensor(t, "tail_bias");
  check_same_device(t, k_tail, "tail_bias", "k_tail");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == k_tail.size(0) && t.size(1) == k_tail.size(1) &&
                  t.size(2) == k_tail.size(2),
              "tail_bias must be [B, Hkv, T] = ", k_tail.sizes().slice(0, 3), ", got ", t.sizes());
}

struct DecodeDims {
  int64_t B, Hq, Hkv, G, S, T, D, k;
  bool aligned, per_head;  // per_head: tail_lens (and tail_start) are [B, Hkv]
};

inline DecodeDims check_holo_decode(const at::Tensor& q, const at::Tensor& k_slots,
                                    const at::Tensor& v_slots, const at::Tensor& phase,
                                    const at::Tensor& slot_lens, const at::Tensor& k_tail,
                                    const at::Tensor& v_tail, const at::Tensor& tail_lens,
                                    const std::string& mode, const std::optional<at::Tensor>& tail_bias,
                                    const std::optional<at::Tensor>& tail_start) {
  TORCH_CHECK(mode == "full" || mode == "aligned", "mode must be \"full\" or \"aligned\", got \"", mode,
              "\"");
  check_float_tensor(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [B, Hq, head_dim], got ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D % 2 == 0, "q: head_dim must be even, got ", D);
  const std::pair<const at::Tensor*, const char*> cache[] = {
      {&k_slots, "k_slots"}, {&v_slots, "v_slots"}, {&k_tail, "k_tail"}, {&v_tail, "v_tail"}};
  for (auto [t, name] : cache) {
    check_float_tensor(*t, name);
    check_same_device(*t, q, name, "q");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " has dtype ", t->scalar_type(),
                " but q has ", q.scalar_type());
    TORCH_CHECK(t->dim() == 4, name, " must be [B, Hkv, len, head_dim], got ", t->sizes());
    TORCH_CHECK(t->size(0) == B, name, ".size(0) = ", t->size(0), " must equal the batch size of q, ", B);
    TORCH_CHECK(t->size(3) == D, name, ".size(3) = ", t->size(3), " must equal head_dim of q, ", D);
  }
  const int64_t Hkv = k_slots.size(1);
  for (auto [t, name] : cache)
    TORCH_CHECK(t->size(1) == Hkv, name, " has ", t->size(1), " KV heads but k_slots has ", Hkv);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q has ", Hq, " heads, which is not a multiple of the ", Hkv,
              " KV heads of k_slots (GQA needs Hq % Hkv == 0)");
  TORCH_CHECK(v_slots.size(2) == k_slots.size(2), "v_slots holds ", v_slots.size(2),
              " slots but k_slots holds ", k_slots.size(2));
  TORCH_CHECK(v_tail.size(2) == k_tail.size(2), "v_tail holds ", v_tail.size(2), " tokens but k_tail holds ",
              k_tail.size(2));
  check_phase(phase, q, "q");
  check_lens(slot_lens, "slot_lens", q, "q", B, Hkv, false);
  const bool per_head = check_lens(tail_lens, "tail_lens", q, "q", B, Hkv, true);
  if (tail_start) {
    check_lens(*tail_start, "tail_start", q, "q", B, Hkv, true);
    TORCH_CHECK(tail_start->sizes() == tail_lens.sizes(), "tail_start must have the shape of tail_lens, ",
                tail_lens.sizes(), ", got ", tail_start->sizes());
  }
  check_tail_bias(tail_bias, k_tail);
  return {B, Hq, Hkv, Hq / Hkv, k_slots.size(2), k_tail.size(2), D, phase.size(0), mode == "aligned", per_head};
}

// An append's new tokens [B, Hkv, head_dim] may be a view with any batch and head strides (a model's v is a slice
// of its fused projection's output: a copy would cost a launch a layer); each token's row must be contiguous.
inline void check_token_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, name, " must be [B, Hkv, head_dim] (one new token per sequence), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, name,
              " must have contiguous rows (stride 1 along head_dim), got strides ", t.strides(),
              " (call .contiguous() first)");
}

// The new tokens k [B, Hkv, head_dim] of an append, one per sequence; returns {B, Hkv, head_dim}.
inline std::array<int64_t, 3> check_new_tokens(const at::Tensor& k) {
  check_token_rows(k, "k");
  return {k.size(0), k.size(1), k.size(2)};
}

// What goes with an append's k: v [B, Hkv, head_dim] and the cache's tensors [B, Hkv, len, head_dim], in k's dtype.
inline void check_like_tokens(const at::Tensor& k, const at::Tensor& v,
                              std::initializer_list<std::pair<const at::Tensor*, const char*>> cache) {
  const int64_t B = k.size(0), H = k.size(1), D = k.size(2);
  const auto check = [&](const at::Tensor& t, const char* name, int64_t rank) {
    if (rank == 3)
      check_token_rows(t, name);
    else
      check_float_tensor(t, name);
    check_same_device(t, k, name, "k");
    TORCH_CHECK(t.scalar_type() == k.scalar_type(), name, " has dtype ", t.scalar_type(), " but k has ",
                k.scalar_type());
    TORCH_CHECK(t.dim() == rank && t.size(0) == B && t.size(1) == H && t.size(rank - 1) == D, name,
                " must be [B, Hkv, ", rank == 4 ? "len, " : "", "head_dim] with B = ", B, ", Hkv = ", H,
                ", head_dim = ", D, " (from k), got ", t.sizes());
  };
  check(v, "v", 3);
  for (auto [t, name] : cache) check(*t, name, 4);
}

// The batch and head strides of an append's new k and v rows (checked above), in units of `unit` bytes (the
// CUDA kernels read rows in units of their element or of a wider piece that divides every stride).
struct RowStrides {
  int64_t kb, kh, vb, vh;
};
inline RowStrides row_strides(const at::Tensor& k, const at::Tensor& v, int64_t unit) {
  const auto in = [&](const at::Tensor& t, int dim) { return t.stride(dim) * t.element_size() / unit; };
  return {in(k, 0), in(k, 1), in(v, 0), in(v, 1)};
}

// holo_append: new tokens k, v [B, Hkv, d] into a superposed cache (see holo_append_cpu.cpp).
struct AppendDims {
  int64_t B, H, S, T, D, k;
};

inline AppendDims check_holo_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& phase,
                                    const at::Tensor& k_slots, const at::Tensor& v_slots, const at::Tensor& k_tail,
                                    const at::Tensor& v_tail, const at::Tensor& slot_lens, const at::Tensor& tail_lens,
                                    const at::Tensor& tail_start, int64_t sinks, double exact_share,
                                    int64_t window_slots, const std::optional<at::Tensor>& evicted) {
  const auto [B, H, D] = check_new_tokens(k);
  check_like_tokens(k, v, {{&k_slots, "k_slots"}, {&v_slots, "v_slots"}, {&k_tail, "k_tail"}, {&v_tail, "v_tail"}});
  TORCH_CHECK(v_slots.size(2) == k_slots.size(2), "v_slots holds ", v_slots.size(2), " slots but k_slots holds ",
              k_slots.size(2));
  TORCH_CHECK(v_tail.size(2) == k_tail.size(2), "v_tail holds ", v_tail.size(2), " rows but k_tail holds ",
              k_tail.size(2));
  TORCH_CHECK(k_tail.size(2) > 0, "k_tail must have room for at least one token");
  check_phase(phase, k, "k");
  check_lens(slot_lens, "slot_lens", k, "k", B, H, false);
  check_lens(tail_lens, "tail_lens", k, "k", B, H, false);
  check_lens(tail_start, "tail_start", k, "k", B, H, false);
  TORCH_CHECK(sinks >= 0, "sinks must be >= 0, got ", sinks);
  TORCH_CHECK(exact_share >= 0 && exact_share <= 1, "exact_share must lie in [0, 1], got ", exact_share);
  TORCH_CHECK(window_slots >= 0, "window_slots must be >= 0 (0: no window), got ", window_slots);
  TORCH_CHECK(window_slots == 0 || evicted, "evicted must be given when window_slots > 0 (it places the slot ring)");
  if (evicted) check_lens(*evicted, "evicted", k, "k", B, H, false);
  return {B, H, k_slots.size(2), k_tail.size(2), D, phase.size(0)};
}

// append_entries: one new entry per sequence, k, v [B, Hkv, d], into the entries [B, Hkv, len, d] that
// holo_decode reads as its tail (exact caches, SRC), at each sequence's (or head's) length.
struct EntriesDims {
  int64_t B, H, cap, D;
  bool per_head;  // lens are [B, H], not [B]
};

inline EntriesDims check_append_entries(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& lens,
                                        const std::optional<at::Tensor>& bias) {
  const auto [B, H, D] = check_new_tokens(k);
  check_like_tokens(k, v, {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}});
  TORCH_CHECK(v_cache.size(2) == k_cache.size(2), "v_cache holds ", v_cache.size(2), " entries but k_cache holds ",
              k_cache.size(2));
  const bool per_head = check_lens(lens, "lens", k, "k", B, H, true);
  if (bias) {
    check_float_tensor(*bias, "bias");
    check_same_device(*bias, k, "bias", "k");
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == B && bias->size(1) == H && bias->size(2) == k_cache.size(2),
                "bias must be [B, Hkv, len] = ", k_cache.sizes().slice(0, 3), ", got ", bias->sizes());
  }
  return {B, H, k_cache.size(2), D, per_head};
}

// holo_append's window (W = window_slots; 0: none, the slots only grow): a sequence holds at most W slots, a
// ring where stream block g (counted from the first slot ever closed) lives in row g mod W, so a slot that
// closes on a full ring replaces the oldest; `evicted` counts the tokens dropped. The row of the j-th slot
// closing now, with `held` tokens in slots and `evicted` dropped before:
inline C10_HOST_DEVICE int64_t slot_row(int64_t held, int64_t evicted, int64_t j, int64_t k, int64_t W) {
  return W ? ((held + evicted) / k + j) % W : held / k + j;
}

// Tokens the slots hold once `superposed` were (the ones held plus those closing now).
inline C10_HOST_DEVICE int64_t slots_held(int64_t superposed, int64_t k, int64_t W) {
  return W && superposed > W * k ? W * k : superposed;
}

// The most slots a sequence may hold in k_slots' S rows.
inline C10_HOST_DEVICE int64_t slot_room(int64_t S, int64_t W) { return W && W < S ? W : S; }

// Whether a sequence's counters are a state holo_append can reach: slots whole and within the room, evicted
// whole and nonzero only on a full ring (so every row slot_row gives lies within the room).
inline C10_HOST_DEVICE bool slot_counters_ok(int64_t held, int64_t evicted, int64_t k, int64_t S, int64_t W) {
  return held >= 0 && held % k == 0 && held <= slot_room(S, W) * k && evicted >= 0 && evicted % k == 0 &&
         (evicted == 0 || held == W * k);
}

// HoloKV's closing rule (python/holokv/caches/superposed.py, HoloSpec.rule): how many of a sequence's
// tokens are superposed once `valid` are held (all those read, unless a window dropped slots). The first
// `sinks` stay exact, then slots close in whole as soon as the exact tokens exceed the share, never before
// they are full.
inline C10_HOST_DEVICE int64_t closed_tokens(int64_t valid, int64_t sinks, int64_t k, double exact_share) {
  const int64_t s = valid < sinks ? valid : sinks;
  int64_t exact = int64_t(floor(double(valid) * exact_share));
  exact = exact > s ? exact : s;
  const int64_t full = (valid - s) / k * k, due = (valid - exact + k - 1) / k * k;
  return full < due ? full : due;
}

// Batched linear algebra takes fp32 [batch, rows, cols] contiguous tensors.
inline void check_fp32_batch(const at::Tensor& t, const char* name, const char* shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, name, " must be ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_batched_eigh(const at::Tensor& a) {
  check_fp32_batch(a, "a", "[batch, n, n]");
  TORCH_CHECK(a.size(1) == a.size(2), "a must be [batch, n, n] (square), got ", a.sizes());
}

// [batch] bool: the triangle the eigensolvers read (the upper one) holds a NaN or an inf. A solver may
// return NaN with success or fail to converge on such input, so the kernels solve zeros there instead
// and report it (info = -1), without a host sync.
inline at::Tensor nonfinite_upper(const at::Tensor& a) { return at::isfinite(a.triu()).logical_not().flatten(1).any(1); }

inline void check_batched_cholesky_solve(const at::Tensor& a, const at::Tensor& b) {
  check_batched_eigh(a);
  check_fp32_batch(b, "b", "[batch, n, k]");
  check_same_device(b, a, "b", "a");
  TORCH_CHECK(b.size(0) == a.size(0), "b.size(0) = ", b.size(0), " must equal the batch of a, ", a.size(0));
  TORCH_CHECK(b.size(1) == a.size(1), "b.size(1) = ", b.size(1), " must equal n = a.size(1) = ", a.size(1));
}

}  // namespace holokv
