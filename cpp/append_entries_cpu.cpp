// CPU kernel of holokv::append_entries: one new entry per sequence (or per head, with [B, H] lengths) written
// in place at its length, its log-mass (where the cache keeps one) set to 0, and the length advanced. Every
// length is checked before anything is written.
#include <cstring>

#include "checks.h"

namespace holokv {

void append_entries_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& lens, const std::optional<at::Tensor>& bias) {
  const EntriesDims ed = check_append_entries(k, v, k_cache, v_cache, lens, bias);
  int64_t* n = lens.data_ptr<int64_t>();
  const int64_t rows = ed.per_head ? ed.B * ed.H : ed.B;
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(n[i] >= 0 && n[i] < ed.cap, "append_entries: lens", ed.per_head ? "[b, h]" : "[b]", " = ", n[i],
                " at row ", i, " must lie in [0, ", ed.cap, ") (grow the cache first)");
  const size_t row_bytes = size_t(ed.D) * k.element_size();
  for (int64_t b = 0; b < ed.B; ++b)
    for (int64_t h = 0; h < ed.H; ++h) {
      const int64_t at = n[ed.per_head ? b * ed.H + h : b], head = b * ed.H + h;
      for (auto [src, dst] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}})  // new rows at any strides
        std::memcpy(static_cast<char*>(dst->data_ptr()) + (head * ed.cap + at) * row_bytes,
                    static_cast<const char*>(src->data_ptr()) +
                        (b * src->stride(0) + h * src->stride(1)) * src->element_size(),
                    row_bytes);
      if (bias) std::memset(static_cast<char*>(bias->data_ptr()) + (head * ed.cap + at) * bias->element_size(), 0,
                            bias->element_size());  // +0.0 in every float dtype
    }
  for (int64_t i = 0; i < rows; ++i) ++n[i];
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) { m.impl("append_entries", &append_entries_cpu); }

}  // namespace holokv
