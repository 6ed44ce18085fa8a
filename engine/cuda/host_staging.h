// HostStaging: the CUDA backend's host-to-device copies without a host stall. cudaMemcpy from
// pageable memory synchronises the stream before it copies, so each small upload of a training
// step (a micro-batch's token ids and targets, each head's loss weights) made the host wait for
// every kernel queued before it. Here the host's bytes go into a ring of pinned memory and an
// asynchronous copy on the stream takes them from there; a region of the ring is written again
// only after the copy that read it has completed (an event per copy, waited for when the ring
// comes round to it, long done by then in a training step). Not thread-safe, as the backend.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <deque>
#include <vector>

namespace eellm::cuda {

class HostStaging {
 public:
  // The ring's size; copies of more than kMaxCopy bytes are not staged (CopyToDevice refuses
  // them: the caller copies synchronously, as for loading parameters).
  static constexpr size_t kRingBytes = size_t{8} << 20;
  static constexpr size_t kMaxCopy = size_t{1} << 20;

  HostStaging() = default;
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  ~HostStaging();

  // Copies `bytes` (at most kMaxCopy) of host_src into the ring and queues their copy to the
  // device's dst on `stream`: host_src may change as soon as this returns, dst holds the bytes in
  // stream order. Returns false, copying nothing, when bytes > kMaxCopy. The ring is allocated
  // at the first call.
  bool CopyToDevice(void* dst, const void* host_src, size_t bytes, cudaStream_t stream);

 private:
  struct InFlight {
    size_t begin, end;  // the ring's bytes the copy reads
    cudaEvent_t done;   // recorded after the copy
  };
  // Waits for the oldest copy in flight and frees its region.
  void Retire();

  char* ring_ = nullptr;
  size_t head_ = 0;                 // where the next region starts
  std::deque<InFlight> in_flight_;  // oldest first, in ring order from head_
  std::vector<cudaEvent_t> free_events_;
};

}  // namespace eellm::cuda
