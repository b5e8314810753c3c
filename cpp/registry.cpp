// The one schema registry of holokv. Kernels register per backend in their own
// files (cpp/*_cpu.cpp, cuda/*.cu); Python adds fake kernels and autograd
// (python/holokv/fake.py, autograd.py) and documents shapes (ops.py).
#include <Python.h>
#include <torch/library.h>

#include "phase_keys.h"

// `import holokv._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(holokv, m) {
  m.def("phase_keys(int k, int head_dim, str rope_layout=\"half\") -> Tensor");
  m.def("superpose(Tensor x, Tensor phase) -> Tensor");
  m.def(
      "holo_decode(Tensor q, Tensor k_slots, Tensor v_slots, Tensor phase, Tensor slot_lens, "
      "Tensor k_tail, Tensor v_tail, Tensor tail_lens, str mode=\"full\", float? scale=None, "
      "float slot_gain=1.0, Tensor? tail_bias=None, Tensor? tail_start=None) -> Tensor");
  m.def(
      "holo_append(Tensor k, Tensor v, Tensor phase, Tensor(a!) k_slots, Tensor(b!) v_slots, Tensor(c!) k_tail, "
      "Tensor(d!) v_tail, Tensor(e!) slot_lens, Tensor(f!) tail_lens, Tensor(g!) tail_start, int sinks, "
      "float exact_share, int window_slots=0, Tensor(h!)? evicted=None) -> ()");
  m.def(
      "append_entries(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lens, "
      "Tensor(d!)? bias=None) -> ()");
  m.def("batched_eigh(Tensor a) -> (Tensor w, Tensor v, Tensor info)");
  m.def("batched_cholesky_solve(Tensor a, Tensor b) -> (Tensor x, Tensor info)");
}

// Built from ATen ops only, so it runs unchanged under fake tensors and on any device.
TORCH_LIBRARY_IMPL(holokv, CompositeExplicitAutograd, m) { m.impl("phase_keys", &holokv::phase_keys); }
