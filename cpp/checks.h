// Argument validation shared by the CPU and CUDA kernels: every bad input gets
// a TORCH_CHECK that names the argument, before any kernel touches memory.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

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

inline void check_keys(const at::Tensor& keys, const at::Tensor& x, const char* x_name) {
  check_float_tensor(keys, "keys");
  check_same_device(keys, x, "keys", x_name);
  TORCH_CHECK(keys.dim() == 2, "keys must be [k, head_dim], got ", keys.sizes());
  TORCH_CHECK(is_pow2_upto16(keys.size(0)), "keys.size(0) = k must be a power of two in {1,2,4,8,16}, got ",
              keys.size(0));
  TORCH_CHECK(keys.size(1) == x.size(-1), "keys.size(1) = ", keys.size(1), " must equal ", x_name,
              ".size(-1) = head_dim = ", x.size(-1));
}

// x [B, H, N, d], keys [k, d]; returns nothing, throws on bad input.
inline void check_superpose(const at::Tensor& x, const at::Tensor& keys) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be [B, H, N, head_dim], got ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, "x: head_dim must be even, got ", x.size(3));
  check_keys(keys, x, "x");
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
  bool aligned;
};

inline DecodeDims check_holo_decode(const at::Tensor& q, const at::Tensor& k_slots,
                                    const at::Tensor& v_slots, const at::Tensor& keys,
                                    const at::Tensor& slot_lens, const at::Tensor& k_tail,
                                    const at::Tensor& v_tail, const at::Tensor& tail_lens,
                                    const std::string& mode, const std::optional<at::Tensor>& tail_bias) {
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
  check_keys(keys, q, "q");
  const std::pair<const at::Tensor*, const char*> lens[] = {{&slot_lens, "slot_lens"},
                                                            {&tail_lens, "tail_lens"}};
  for (auto [t, name] : lens) {
    TORCH_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, name, " must be [B] = [", B, "], got ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
    check_same_device(*t, q, name, "q");
  }
  check_tail_bias(tail_bias, k_tail);
  return {B, Hq, Hkv, Hq / Hkv, k_slots.size(2), k_tail.size(2), D, keys.size(0), mode == "aligned"};
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

inline void check_batched_cholesky_solve(const at::Tensor& a, const at::Tensor& b) {
  check_batched_eigh(a);
  check_fp32_batch(b, "b", "[batch, n, k]");
  check_same_device(b, a, "b", "a");
  TORCH_CHECK(b.size(0) == a.size(0), "b.size(0) = ", b.size(0), " must equal the batch of a, ", a.size(0));
  TORCH_CHECK(b.size(1) == a.size(1), "b.size(1) = ", b.size(1), " must equal n = a.size(1) = ", a.size(1));
}

}  // namespace holokv
