// CPU reference kernel of holokv::holo_decode: one query per sequence over a
// superposed cache plus an exact tail, scored entry by entry in opmath precision.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"

namespace holokv {

at::Tensor holo_decode_cpu(const at::Tensor& q, const at::Tensor& k_slots, const at::Tensor& v_slots,
                           const at::Tensor& phase, const at::Tensor& slot_lens, const at::Tensor& k_tail,
                           const at::Tensor& v_tail, const at::Tensor& tail_lens, c10::string_view mode,
                           std::optional<double> scale, double slot_gain,
                           const std::optional<at::Tensor>& tail_bias, const std::optional<at::Tensor>& tail_start) {
  const DecodeDims dd = check_holo_decode(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens,
                                          std::string(mode), tail_bias, tail_start);
  const at::Tensor bias = tail_bias ? tail_bias->to(at::kDouble) : at::Tensor();
  const int64_t B = dd.B, Hq = dd.Hq, Hkv = dd.Hkv, G = dd.G, S = dd.S, T = dd.T, D = dd.D, k = dd.k;
  const int64_t* sl = slot_lens.data_ptr<int64_t>();
  const int64_t* tl = tail_lens.data_ptr<int64_t>();
  const int64_t* ts = tail_start ? tail_start->data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] <= S * k, "slot_lens[", b, "] = ", sl[b], " is outside [0, k * ", S,
                " slots]");
  for (int64_t i = 0; i < tail_lens.numel(); ++i) {
    TORCH_CHECK(tl[i] >= 0 && tl[i] <= T, "tail_lens[", i, "] = ", tl[i], " is outside [0, ", T, "]");
    if (ts) TORCH_CHECK(ts[i] >= 0 && (ts[i] < T || ts[i] == 0), "tail_start[", i, "] = ", ts[i], " is outside [0, ", T, ")");
  }
  const double sc = scale.value_or(1.0 / std::sqrt(double(D)));
  const double root_k = std::sqrt(double(k));
  at::Tensor phi = phase.to(at::kDouble);
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "holo_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double* pp = phi.data_ptr<double>();
    at::parallel_for(0, B * Hq, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> logits, acc(D);
      std::vector<const scalar_t*> vrows;
      std::vector<const double*> vkeys;  // demodulating key of each entry; nullptr for exact tokens
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / Hq, kvh = (bh % Hq) / G;
        const scalar_t* qr = q.data_ptr<scalar_t>() + bh * D;
        const int64_t lens_at = dd.per_head ? b * Hkv + kvh : b;  // tail_lens/tail_start [B] or [B, Hkv]
        const int64_t n_sup = sl[b], n_slots = ceil_div(n_sup, k), n_tail = tl[lens_at], start = ts ? ts[lens_at] : 0;
        const int64_t own_phase = (n_sup + n_tail - 1 + k) % k;
        logits.clear(), vrows.clear(), vkeys.clear();
        auto add = [&](const scalar_t* kr, const scalar_t* vr, const double* key, double gain, double offset) {
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += acc_t(qr[d]) * acc_t(key ? key[d] : 1.0) * acc_t(kr[d]);
          logits.push_back(acc_t(gain) * dot + acc_t(offset)), vrows.push_back(vr), vkeys.push_back(key);
        };
        for (int64_t s = 0; s < n_slots; ++s) {
          const int64_t off = ((b * Hkv + kvh) * S + s) * D;
          const scalar_t *kr = k_slots.data_ptr<scalar_t>() + off, *vr = v_slots.data_ptr<scalar_t>() + off;
          if (dd.aligned)
            add(kr, vr, pp + own_phase * D, sc * slot_gain, 0.0);
          else
            for (int64_t j = 0; j < k && s * k + j < n_sup; ++j) add(kr, vr, pp + j * D, sc * slot_gain, 0.0);
        }
        for (int64_t t = 0; t < n_tail; ++t) {  // a ring: entry t lives in row (start + t) mod T
          const int64_t off = ((b * Hkv + kvh) * T + (start + t) % T) * D;
          const double offset = bias.defined() ? bias.data_ptr<double>()[off / D] : 0.0;
          add(k_tail.data_ptr<scalar_t>() + off, v_tail.data_ptr<scalar_t>() + off, nullptr, sc, offset);
        }
        // The README's conventions: a NaN or +inf logit makes the row NaN (softmax's inf - inf); a row
        // whose logits are all -inf (everything masked), or that has none, is zeros.
        constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
        acc_t mx = -inf;
        bool nan_row = false;
        for (const acc_t l : logits) nan_row |= std::isnan(l) || l == inf, mx = std::max(mx, l);
        const bool attends = !nan_row && mx > -inf;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t denom = 0;
        for (size_t e = 0; attends && e < logits.size(); ++e) {
          const acc_t p = std::exp(logits[e] - mx);
          denom += p;
          const acc_t w = vkeys[e] ? p * acc_t(root_k) : p;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * acc_t(vkeys[e] ? vkeys[e][d] : 1.0) * acc_t(vrows[e][d]);
        }
        const acc_t fill = nan_row ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
        scalar_t* orow = out.data_ptr<scalar_t>() + bh * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = scalar_t(attends ? acc[d] / denom : fill);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) { m.impl("holo_decode", &holo_decode_cpu); }

}  // namespace holokv
