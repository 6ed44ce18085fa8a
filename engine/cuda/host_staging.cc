#include "engine/cuda/host_staging.h"

#include <cstring>

#include "engine/cuda/cuda_check.h"

namespace eellm::cuda {
namespace {

constexpr size_t kAlign = 64;
// At most this many copies in flight (each holds an event): past it the oldest is waited for.
constexpr size_t kMaxInFlight = 256;

}  // namespace

HostStaging::~HostStaging() {
  for (const InFlight& f : in_flight_) {
    cudaEventSynchronize(f.done);
    cudaEventDestroy(f.done);
  }
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  if (ring_ != nullptr) cudaFreeHost(ring_);
}

void HostStaging::Retire() {
  const InFlight f = in_flight_.front();
  in_flight_.pop_front();
  CUDA_CHECK(cudaEventSynchronize(f.done));
  free_events_.push_back(f.done);
}

bool HostStaging::CopyToDevice(void* dst, const void* host_src, size_t bytes, cudaStream_t stream) {
  if (bytes > kMaxCopy) return false;
  if (bytes == 0) return true;
  if (ring_ == nullptr) {
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ring_), kRingBytes, cudaHostAllocDefault));
  }
  const size_t need = (bytes + kAlign - 1) / kAlign * kAlign;
  size_t begin = head_;
  if (begin + need > kRingBytes) {
    // Wrap: the copies in [head_, end of the ring) are the oldest in flight; they go first.
    while (!in_flight_.empty() && in_flight_.front().begin >= head_) Retire();
    begin = 0;
  }
  // Then every copy still reading a byte of [begin, begin + need), oldest first.
  while (!in_flight_.empty() && in_flight_.front().begin < begin + need &&
         begin < in_flight_.front().end) {
    Retire();
  }
  while (in_flight_.size() >= kMaxInFlight) Retire();
  cudaEvent_t done = nullptr;
  if (free_events_.empty()) {
    CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  } else {
    done = free_events_.back();
    free_events_.pop_back();
  }
  std::memcpy(ring_ + begin, host_src, bytes);
  CUDA_CHECK(cudaMemcpyAsync(dst, ring_ + begin, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaEventRecord(done, stream));
  in_flight_.push_back({begin, begin + need, done});
  head_ = begin + need;
  return true;
}

}  // namespace eellm::cuda
