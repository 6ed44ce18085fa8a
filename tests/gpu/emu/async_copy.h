// The CPU emulation of engine/cuda/async_copy.cuh (included from there under
// EELLM_CUDA_EMULATION). A copy reads its source when it starts but writes shared memory only at
// the CpAsyncWait that covers its group, the latest the device may, so a kernel that reads a tile
// before waiting for it computes on stale data and fails its parity tests. (A copy into a buffer
// other warps still read, a missing barrier, does not show: the emulation's warp-collective
// loads and MMAs synchronise the whole block; tools/gpu_check.sh runs racecheck on the GPU.)
// Copies must be 16-byte aligned, from device memory into the block's dynamic shared memory,
// else the emulation aborts.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda_emulation.h"

namespace eellm_emu {
inline ThreadCopies& MyCopies() {
  Sched().async_used = true;
  return Sched().async_copies[LinearThread()];
}
}  // namespace eellm_emu

namespace eellm::cuda {

inline void CpAsync16(void* dst, const void* src, bool fill) {
  const bool aligned =
      reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (!aligned || !eellm_emu::InDynamicShared(dst, 16) ||
      !eellm_emu::IsDevice(src, fill ? 16 : 1)) {
    std::fprintf(stderr,
                 "CUDA emulation: cp.async from %p to %p: needs 16-byte aligned device memory "
                 "into dynamic shared memory\n",
                 src, dst);
    std::abort();
  }
  eellm_emu::PendingCopy c{dst, {}};
  if (fill) std::memcpy(c.bytes, src, 16);
  eellm_emu::MyCopies().open.push_back(c);
}

inline void CpAsyncCommit() {
  eellm_emu::ThreadCopies& t = eellm_emu::MyCopies();
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}

template <int N>
void CpAsyncWait() {
  eellm_emu::ThreadCopies& t = eellm_emu::MyCopies();
  while (t.committed.size() > static_cast<size_t>(N)) {
    for (const eellm_emu::PendingCopy& c : t.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    t.committed.pop_front();
  }
}

}  // namespace eellm::cuda
