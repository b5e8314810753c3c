#pragma once
#include <ATen/ATen.h>

#include <string>

namespace holokv {
// [k, head_dim] float32 ±1 Walsh-Hadamard keys obeying the Strict Even-Boundary Rule.
at::Tensor phase_keys(int64_t k, int64_t head_dim, const std::string& rope_layout);
}  // namespace holokv
