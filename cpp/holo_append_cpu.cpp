// CPU kernel of holokv::holo_append: one new token per sequence into a HoloKV cache,
// in place. Per sequence: close the slots that HoloKV's rule says are due (the oldest
// exact stream tokens of the tail ring, modulated and summed into the next slot, which
// is written once), move the sinks past them and advance the ring, then append the new
// token to the ring. The tail ring holds [sinks | exact stream tokens] from tail_start. With a window of
// slots (checks.h, slot_row) the rule counts the tokens held, so the exact share is a share of what the
// window covers and memory stays bounded.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "checks.h"

namespace holokv {

void holo_append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& phase, const at::Tensor& k_slots,
                     const at::Tensor& v_slots, const at::Tensor& k_tail, const at::Tensor& v_tail,
                     const at::Tensor& slot_lens, const at::Tensor& tail_lens, const at::Tensor& tail_start,
                     int64_t sinks, double exact_share, int64_t window_slots,
                     const std::optional<at::Tensor>& evicted) {
  const AppendDims ad = check_holo_append(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens,
                                          tail_start, sinks, exact_share, window_slots, evicted);
  const int64_t B = ad.B, H = ad.H, S = ad.S, T = ad.T, D = ad.D, kk = ad.k, W = window_slots;
  int64_t *sl = slot_lens.data_ptr<int64_t>(), *tl = tail_lens.data_ptr<int64_t>(),
          *ts = tail_start.data_ptr<int64_t>(), *ev = W ? evicted->data_ptr<int64_t>() : nullptr;
  const auto dropped = [&](int64_t b) { return ev ? ev[b] : int64_t(0); };
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot_counters_ok(sl[b], 0, kk, S, W), "slot_lens[", b, "] = ", sl[b], " must be a multiple of k = ",
                kk, " in [0, ", slot_room(S, W) * kk, "]");
    TORCH_CHECK(slot_counters_ok(sl[b], dropped(b), kk, S, W), "evicted[", b, "] = ", dropped(b),
                " must be a multiple of k = ", kk, ", nonzero only while all window_slots = ", W,
                " slots are held (slot_lens[", b, "] = ", sl[b], ")");
    TORCH_CHECK(tl[b] >= 0 && tl[b] <= T && ts[b] >= 0 && ts[b] < T, "tail_lens[", b, "] = ", tl[b],
                " and tail_start[", b, "] = ", ts[b], " must lie in [0, ", T, "]");
    const int64_t close = closed_tokens(sl[b] + tl[b], sinks, kk, exact_share) - sl[b];
    TORCH_CHECK(slots_held(sl[b] + close, kk, W) <= S * kk, "holo_append: sequence ", b, " needs slot ",
                slots_held(sl[b] + close, kk, W) / kk, " but k_slots holds ", S, " (grow the cache first)");
    TORCH_CHECK(tl[b] - close + 1 <= T, "holo_append: sequence ", b, " needs ", tl[b] - close + 1,
                " tail rows but k_tail holds ", T, " (grow the cache first)");
  }
  at::Tensor phi = phase.to(at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "holo_append_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double* pp = phi.data_ptr<double>();
    const acc_t norm = acc_t(1.0 / std::sqrt(double(kk)));
    const std::pair<const at::Tensor*, std::pair<const at::Tensor*, const at::Tensor*>> kv[] = {
        {&k, {&k_slots, &k_tail}}, {&v, {&v_slots, &v_tail}}};
    for (int64_t b = 0; b < B; ++b) {
      const int64_t valid = sl[b] + tl[b], close = closed_tokens(valid, sinks, kk, exact_share) - sl[b];
      const int64_t n_sinks = std::min(valid, sinks), start = ts[b];
      const auto row = [&](int64_t i) { return (start + i) % T; };
      for (auto [x, dst] : kv) {
        scalar_t* slots = dst.first->data_ptr<scalar_t>();
        scalar_t* tail = dst.second->data_ptr<scalar_t>();
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* th = tail + (b * H + h) * T * D;
          for (int64_t j = 0; j < close / kk; ++j) {  // each due block becomes one slot, written once
            scalar_t* out = slots + ((b * H + h) * S + slot_row(sl[b], dropped(b), j, kk, W)) * D;
            for (int64_t d = 0; d < D; ++d) {
              acc_t acc = 0;
              for (int64_t t = 0; t < kk; ++t) acc += acc_t(th[row(n_sinks + j * kk + t) * D + d]) * acc_t(pp[t * D + d]);
              out[d] = scalar_t(acc * norm);
            }
          }
          for (int64_t i = n_sinks - 1; close > 0 && i >= 0; --i)  // sinks move past the closed rows, last first
            for (int64_t d = 0; d < D; ++d) th[row(close + i) * D + d] = th[row(i) * D + d];
          const scalar_t* xr = x->data_ptr<scalar_t>() + b * x->stride(0) + h * x->stride(1);  // any strides
          for (int64_t d = 0; d < D; ++d) th[row(tl[b]) * D + d] = xr[d];  // (start + close) + (tl - close)
        }
      }
      const int64_t held = slots_held(sl[b] + close, kk, W);
      if (ev) ev[b] += sl[b] + close - held;
      ts[b] = (start + close) % T, tl[b] += 1 - close, sl[b] = held;
    }
  });
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) { m.impl("holo_append", &holo_append_cpu); }

}  // namespace holokv
