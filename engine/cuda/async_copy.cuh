// Asynchronous copies from global to shared memory (cp.async, sm_80 and later), so that a
// kernel loads its next tile while it computes on the current one:
//   CpAsync16(dst, src, fill)  starts a 16-byte copy (dst in shared memory, src in global memory,
//                              both 16-byte aligned); with fill false it writes 16 zero bytes and
//                              reads nothing (src must still be a valid address);
//   CpAsyncCommit()            closes the group of copies this thread started since the last one;
//   CpAsyncWait<N>()           returns when at most N of this thread's groups are still in
//                              flight. Other threads see the data after a __syncthreads;
//   CpAsyncWaitFor<G>(k)       the same for a group index k known at run time (below).
// The CPU emulation of tests/gpu/emu (EELLM_CUDA_EMULATION) provides the same functions and lands
// the copies as late as the device may: at the wait that covers them.
#pragma once

#include <cuda_runtime.h>

#ifdef EELLM_CUDA_EMULATION
#include "tests/gpu/emu/async_copy.h"
#else

namespace eellm::cuda {

__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool fill) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace eellm::cuda

#endif  // EELLM_CUDA_EMULATION

namespace eellm::cuda {

// CpAsyncWait<kGroups - 1 - k>() for a k known only at run time (0 <= k < kGroups): with the last
// kGroups groups committed in order, returns when this thread's copies of groups 0 .. k landed.
template <int kGroups>
__device__ __forceinline__ void CpAsyncWaitFor(int k) {
  if constexpr (kGroups <= 1) {
    CpAsyncWait<0>();
  } else if (k == 0) {
    CpAsyncWait<kGroups - 1>();
  } else {
    CpAsyncWaitFor<kGroups - 1>(k - 1);
  }
}

}  // namespace eellm::cuda
