// Programmatic dependent launch (compute capability 9 on). A decode step is a chain of short kernels, each
// paying its launch, ramp and tail in turn; a kernel launched by launch_pdl may launch while the kernel before
// it in the stream finishes (its blocks take the SMs that one's blocks leave). It calls pdl_wait() before it
// touches memory: griddepcontrol.wait returns once the kernels before it have completed and their writes are
// visible (at once in a kernel launched plainly, and before Hopper it compiles to nothing). pdl_launch_dependents()
// lets the next such kernel launch; whatever it triggers, that one waits the same way, so where the trigger
// sits is a matter of speed only.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace holokv {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// On the current device, from compute capability 9; HOLOKV_PDL=0 in the environment turns it off (a profiler
// or a sanitizer that wants kernels one after another).
inline bool pdl_enabled() {
  static const bool allowed = [] {
    const char* env = std::getenv("HOLOKV_PDL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return allowed && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// The launch attribute that lets a kernel overlap the one before it, where pdl_enabled().
inline cudaLaunchAttribute pdl_attribute() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

// kernel<<<grid, block, smem, stream>>>(args...), overlapping the kernel before it where pdl_enabled().
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr = pdl_attribute();
  config.attrs = &attr;
  config.numAttrs = pdl_enabled();
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace holokv
