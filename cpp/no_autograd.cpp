// Autograd kernels of holokv::holo_decode, holokv::holo_append and holokv::append_entries, which have no
// derivative. Without
// one, a call on inputs that require grad runs, returns an output with no grad_fn and only warns at
// backward (the gradient silently stays None); these make that call fail at once, naming the input.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace holokv {
namespace {

using Named = std::pair<const at::Tensor*, const char*>;

void check_no_grad(const char* op, std::initializer_list<Named> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (auto [t, name] : inputs)
    TORCH_CHECK(!t->defined() || !t->requires_grad(), op, " is not differentiable, but its ", name,
                " requires grad: call it under torch.no_grad() or torch.inference_mode(), or pass ", name,
                ".detach()");
}

const at::Tensor& or_undefined(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t ? *t : undefined;
}

at::Tensor holo_decode_autograd(const at::Tensor& q, const at::Tensor& k_slots, const at::Tensor& v_slots,
                                const at::Tensor& phase, const at::Tensor& slot_lens, const at::Tensor& k_tail,
                                const at::Tensor& v_tail, const at::Tensor& tail_lens, c10::string_view mode,
                                std::optional<double> scale, double slot_gain,
                                const std::optional<at::Tensor>& tail_bias,
                                const std::optional<at::Tensor>& tail_start) {
  check_no_grad("holo_decode", {{&q, "q"}, {&k_slots, "k_slots"}, {&v_slots, "v_slots"}, {&phase, "phase"},
                                {&k_tail, "k_tail"}, {&v_tail, "v_tail"}, {&or_undefined(tail_bias), "tail_bias"}});
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("holokv::holo_decode", "")
                              .typed<decltype(holo_decode_autograd)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens, mode, scale, slot_gain,
                 tail_bias, tail_start);
}

void holo_append_autograd(const at::Tensor& k, const at::Tensor& v, const at::Tensor& phase,
                          const at::Tensor& k_slots, const at::Tensor& v_slots, const at::Tensor& k_tail,
                          const at::Tensor& v_tail, const at::Tensor& slot_lens, const at::Tensor& tail_lens,
                          const at::Tensor& tail_start, int64_t sinks, double exact_share, int64_t window_slots,
                          const std::optional<at::Tensor>& evicted) {
  check_no_grad("holo_append", {{&k, "k"}, {&v, "v"}, {&phase, "phase"}, {&k_slots, "k_slots"},
                                {&v_slots, "v_slots"}, {&k_tail, "k_tail"}, {&v_tail, "v_tail"}});
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("holokv::holo_append", "")
                              .typed<decltype(holo_append_autograd)>();
  at::AutoDispatchBelowADInplaceOrView below;
  op.call(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks, exact_share,
          window_slots, evicted);
}

void append_entries_autograd(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& lens, const std::optional<at::Tensor>& bias) {
  check_no_grad("append_entries", {{&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                   {&or_undefined(bias), "bias"}});
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("holokv::append_entries", "")
                              .typed<decltype(append_entries_autograd)>();
  at::AutoDispatchBelowADInplaceOrView below;
  op.call(k, v, k_cache, v_cache, lens, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(holokv, Autograd, m) {
  m.impl("holo_decode", &holo_decode_autograd);
  m.impl("holo_append", &holo_append_autograd);
  m.impl("append_entries", &append_entries_autograd);
}

}  // namespace holokv
