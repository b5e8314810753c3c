// Phase keys Phi_j[i] = H_k[j, g(i)]: H_k is the Sylvester Walsh-Hadamard matrix,
// g(i) = (RoPE pair of i) mod k. Dimensions RoPE rotates together share a pair,
// hence a sign, so RoPE commutes with the elementwise product by Phi_j.
#include "phase_keys.h"

#include "checks.h"

namespace holokv {

at::Tensor phase_keys(int64_t k, int64_t head_dim, const std::string& rope_layout) {
  TORCH_CHECK(is_pow2_upto16(k), "k must be a power of two in {1,2,4,8,16}, got ", k);
  TORCH_CHECK(rope_layout == "half" || rope_layout == "interleaved",
              "rope_layout must be \"half\" (rotate_half: i, i+d/2) or \"interleaved\" (2i, 2i+1), got \"",
              rope_layout, "\"");
  TORCH_CHECK(head_dim > 0 && head_dim % (2 * k) == 0, "head_dim must be a positive multiple of 2*k = ",
              2 * k, " so that each of the k sign groups holds whole RoPE pairs, got ", head_dim);
  at::Tensor h = at::ones({1, 1});
  while (h.size(0) < k) h = at::kron(at::tensor({1.f, 1.f, 1.f, -1.f}).view({2, 2}), h);
  at::Tensor i = at::arange(head_dim);
  at::Tensor pair = rope_layout == "half" ? at::remainder(i, head_dim / 2) : at::floor_divide(i, 2);
  return h.index_select(1, at::remainder(pair, k));
}

}  // namespace holokv
