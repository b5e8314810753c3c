// holokv's own cuSOLVER handles: torch keeps its solver handle in a library that
// extensions cannot link (libtorch_cuda_linalg), so we cache one per thread and device.
#pragma once
#include <c10/util/Exception.h>
#include <cusolverDn.h>

#define HOLOKV_CUSOLVER_CHECK(expr)                                                      \
  do {                                                                                   \
    const cusolverStatus_t holokv_status = (expr);                                       \
    TORCH_CHECK(holokv_status == CUSOLVER_STATUS_SUCCESS, #expr, " failed with cuSOLVER " \
                "status ", static_cast<int>(holokv_status));                             \
  } while (0)

namespace holokv {

struct SolverHandle {
  cusolverDnHandle_t dn;
  cusolverDnParams_t params;  // for the 64-bit API (cusolverDnX*), default settings
  syevjInfo_t syevj;          // Jacobi settings: default tolerance and sweeps, sorted eigenvalues
};

// The calling thread's handle for the current CUDA device, created on first use and
// bound to torch's current stream (set on every call: the stream may change between calls).
SolverHandle current_solver();

}  // namespace holokv
