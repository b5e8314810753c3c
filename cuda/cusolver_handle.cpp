// Per-thread, per-device cuSOLVER handles (as torch does for its own): one handle is
// never used by two threads at once, since its calls on different streams could share
// its internal state. A thread that exits gives its handles back to a free list for
// the next thread; handles are never destroyed, because destroying them at process
// exit can race the CUDA driver's own teardown.
#include "cusolver_handle.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>

#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace holokv {
namespace {

struct FreeList {
  std::mutex mutex;
  std::unordered_map<c10::DeviceIndex, std::vector<SolverHandle>> by_device;
};

FreeList& free_list() {
  static auto* list = new FreeList();  // leaked: threads may exit after static destructors ran
  return *list;
}

struct ThreadHandles {
  std::unordered_map<c10::DeviceIndex, SolverHandle> by_device;
  ~ThreadHandles() {  // no CUDA calls here: only hand the handles over
    FreeList& fl = free_list();
    std::lock_guard<std::mutex> lock(fl.mutex);
    for (const auto& [device, handle] : by_device) fl.by_device[device].push_back(handle);
  }
};

SolverHandle create_handle() {
  SolverHandle h;
  HOLOKV_CUSOLVER_CHECK(cusolverDnCreate(&h.dn));
  HOLOKV_CUSOLVER_CHECK(cusolverDnCreateParams(&h.params));
  HOLOKV_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&h.syevj));
  HOLOKV_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(h.syevj, 1));
  return h;
}

}  // namespace

SolverHandle current_solver() {
  thread_local ThreadHandles mine;
  const c10::DeviceIndex device = c10::cuda::current_device();
  auto it = mine.by_device.find(device);
  if (it == mine.by_device.end()) {
    std::optional<SolverHandle> reused;
    {
      FreeList& fl = free_list();
      std::lock_guard<std::mutex> lock(fl.mutex);
      auto& spare = fl.by_device[device];
      if (!spare.empty()) reused = spare.back(), spare.pop_back();
    }
    // cusolverDnCreate binds the handle to the current device, which the caller's guard set.
    it = mine.by_device.emplace(device, reused ? *reused : create_handle()).first;
  }
  HOLOKV_CUSOLVER_CHECK(cusolverDnSetStream(it->second.dn, at::cuda::getCurrentCUDAStream()));
  return it->second;
}

}  // namespace holokv
