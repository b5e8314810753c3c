// CPU kernel of holokv::decode_linear: y = x weightᵀ for the few rows of a decode step, accumulated in fp32
// for 16-bit inputs (as the CUDA kernel's tensor cores do) and rounded once to x's dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"

namespace holokv {

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_decode_linear(x, weight);
  const auto acc = at::toOpMathType(x.scalar_type());
  return at::mm(x.to(acc), weight.to(acc).t()).to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(holokv, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace holokv
