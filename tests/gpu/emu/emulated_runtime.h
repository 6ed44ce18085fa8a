// The runtime half of the CPU emulation of CUDA (cuda_emulation.h, which includes this; the kernel
// half, launches and the threads of a block, is there): runtime types, device memory (recorded
// host allocations, so that host memory passed where the device needs device memory is reported),
// pinned memory, and a device that runs behind the host: the legacy stream's work (kernels, GEMMs,
// uploads from pinned memory) is deferred until an operation could observe it, other streams'
// results land only as late as their events allow, and the host's waits for pending work are
// counted. Copies, memsets, streams and events on top of that.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <utility>

// ---- runtime types ------------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3
};

namespace eellm_emu {
inline cudaError_t g_last_error = cudaSuccess;  // set by failed launches, as on the device

// Device memory is host memory here, but every cudaMalloc'd range is recorded, so that a host
// pointer where the device needs device memory (a kernel argument, a cuBLAS operand, the device
// side of a copy) is reported, as it would fault or fail on a GPU.
inline std::map<uintptr_t, size_t>& Allocations() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
// Whether [p, p + bytes) lies inside one of the recorded `ranges` (start -> bytes).
inline bool InOneRange(const std::map<uintptr_t, size_t>& ranges, const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = ranges.upper_bound(a);
  if (it == ranges.begin()) return false;
  --it;
  return a + bytes <= it->first + it->second;
}
// Whether [p, p + bytes) lies inside one cudaMalloc'd range.
inline bool IsDevice(const void* p, size_t bytes) { return InOneRange(Allocations(), p, bytes); }
inline bool IsHost(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto& m = Allocations();
  auto it = m.upper_bound(a + (bytes > 0 ? bytes - 1 : 0));
  if (it == m.begin()) return true;
  --it;
  return it->first + it->second <= a;
}
inline cudaError_t Misuse(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  return cudaErrorInvalidValue;
}
// cudaMalloc's and cudaHostAlloc's allocation (256-byte aligned host memory), recorded in
// `ranges`, and their frees (`misuse` reported for a pointer not recorded there).
inline cudaError_t AllocRecorded(std::map<uintptr_t, size_t>& ranges, void** p, size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  *p = std::aligned_alloc(256, rounded);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  ranges[reinterpret_cast<uintptr_t>(*p)] = bytes;
  return cudaSuccess;
}
inline cudaError_t FreeRecorded(std::map<uintptr_t, size_t>& ranges, void* p, const char* misuse) {
  if (p == nullptr) return cudaSuccess;
  if (ranges.erase(reinterpret_cast<uintptr_t>(p)) == 0) return Misuse(misuse);
  std::free(p);
  return cudaSuccess;
}
}  // namespace eellm_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = eellm_emu::g_last_error;
  eellm_emu::g_last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error (emulated)";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated)";
    default:
      return "out of memory (emulated)";
  }
}
// One emulated device; memory is host memory, 256-byte aligned like cudaMalloc's.
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device) {
  if (device != 0 || len < 13) return cudaErrorInvalidValue;
  std::snprintf(id, static_cast<size_t>(len), "0000:00:00.0");
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The device's SM count and shared memory a block may opt into, as an H100's or H200's (the
// backend sizes the decoding kernel's splits by the SMs: the same work splits the same way here).
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Pinned host memory (cudaHostAlloc) is recorded too: an asynchronous copy from it to the device
// may read its source late, so a host that writes the source again before the copy is known to
// have completed (its event waited for) corrupts the copy, as it would on a GPU.
//
// The device runs behind the host: the work of the legacy default stream (nullptr, the backends'
// stream) is deferred. A kernel launch or GEMM completes the work issued before it and is itself
// deferred; a copy from pinned memory is deferred behind what is pending. Deferred work completes
// at the next operation that could observe it: a launch or library call on the legacy stream, a
// copy or memset, a synchronisation, cudaFree, or waiting for an event recorded after it. An
// operation on another stream (NCCL's) completes only the work that stream waited for (see
// CUstream_st), so it reads a kernel's, a GEMM's or an upload's output only after an event wait
// ordered it after them, as on a GPU.
namespace eellm_emu {
inline std::map<uintptr_t, size_t>& PinnedAllocations() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
inline bool IsPinned(const void* p, size_t bytes) {
  return InOneRange(PinnedAllocations(), p, bytes);
}
struct Deferred {
  std::deque<std::function<void()>> work;  // in issue order
  uint64_t issued = 0;  // operations deferred so far; the first of `work` is number
                        // issued - work.size()
};
inline Deferred& DeferredWork() {
  static Deferred d;
  return d;
}
// Completes the deferred work issued before the first `issued` (all by default), in order.
inline void CompleteWork(uint64_t issued = ~uint64_t{0}) {
  Deferred& d = DeferredWork();
  while (!d.work.empty() && d.issued - d.work.size() < issued) {
    std::function<void()> op = std::move(d.work.front());
    d.work.pop_front();
    op();
  }
}
inline void Defer(std::function<void()> op) {
  DeferredWork().work.push_back(std::move(op));
  ++DeferredWork().issued;
}
}  // namespace eellm_emu
constexpr unsigned cudaHostAllocDefault = 0;
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  return eellm_emu::AllocRecorded(eellm_emu::PinnedAllocations(), p, bytes);
}
namespace eellm_emu {
inline void CompleteAll();  // (below, with the streams)
}  // namespace eellm_emu
inline cudaError_t cudaFreeHost(void* p) {
  eellm_emu::CompleteAll();
  return eellm_emu::FreeRecorded(eellm_emu::PinnedAllocations(), p,
                                 "cudaFreeHost of a pointer cudaHostAlloc did not return");
}
// Streams. Another stream than the legacy one sees, of the legacy stream's deferred work, only
// what its waits for events ordered it after: `waited`, the work issued before the last event it
// waited for. A stream created without cudaStreamNonBlocking sees all (it synchronises with the
// legacy stream). So an NCCL operation that reads a kernel's output or an upload without
// AfterCompute reads stale data, as it may on a GPU.
//
// The other direction: an operation on a non-blocking stream (an NCCL collective) computes when
// it is issued, but its results land in their destination only as late as the device allows
// (`landings`, in order): when that stream is synchronised, when the host waits for an event
// recorded on it after them, at the stream's next operation, or, once the legacy stream waited
// for such an event, in order in the legacy stream's work. So a kernel that reads an NCCL result
// without ComputeAfter reads stale data too.
constexpr unsigned cudaStreamNonBlocking = 1;
struct CUstream_st {
  uint64_t id = 0;  // non-blocking streams: 1, 2, ... in creation order, never reused
  bool non_blocking = false;
  uint64_t waited = 0;
  std::deque<std::function<void()>> landings;  // results still to land, in issue order
  uint64_t landings_issued = 0;  // the first of `landings` is number landings_issued - size
};
namespace eellm_emu {
inline bool Legacy(cudaStream_t s) { return s == nullptr || !s->non_blocking; }
// The non-blocking streams alive, by id (events and queued landings name a stream by its id, which
// a later stream does not reuse, unlike its address).
inline std::map<uint64_t, cudaStream_t>& NonBlockingStreams() {
  static std::map<uint64_t, cudaStream_t> streams;
  return streams;
}
inline cudaStream_t StreamOf(uint64_t id) {
  auto it = NonBlockingStreams().find(id);
  return it == NonBlockingStreams().end() ? nullptr : it->second;
}
// Lands the results of the operations on non-blocking stream `id` issued before the first `upto`
// (all by default); nothing if the stream was destroyed (which landed all).
inline void Land(uint64_t id, uint64_t upto = ~uint64_t{0}) {
  const cudaStream_t s = StreamOf(id);
  if (s == nullptr) return;
  while (!s->landings.empty() && s->landings_issued - s->landings.size() < upto) {
    std::function<void()> land = std::move(s->landings.front());
    s->landings.pop_front();
    land();
  }
}
// Host waits: the calls that block the host until device work completes (synchronisations, copies
// to the host, synchronous copies from pageable memory, cudaFree), counted when they find such
// work pending, where a GPU would stall the host (tests count them in a training step).
inline int64_t g_host_waits = 0;
inline bool LegacyPending(uint64_t upto = ~uint64_t{0}) {
  const Deferred& d = DeferredWork();
  return !d.work.empty() && d.issued - d.work.size() < upto;
}
inline bool LandingsPending(uint64_t id, uint64_t upto = ~uint64_t{0}) {
  const cudaStream_t s = StreamOf(id);
  return s != nullptr && !s->landings.empty() && s->landings_issued - s->landings.size() < upto;
}
inline void CountHostWait(bool pending) {
  if (pending) ++g_host_waits;
}
// The legacy stream's work, then every stream's results (a device-wide synchronisation, which
// the host waits for).
inline void CompleteAll() {
  bool pending = LegacyPending();
  for (const auto& [id, s] : NonBlockingStreams()) pending = pending || LandingsPending(id);
  CountHostWait(pending);
  CompleteWork();
  for (const auto& [id, s] : NonBlockingStreams()) Land(id);  // (in creation order)
}
// The result of an operation on `s`, to land late (see above); on the legacy stream, in order
// in its work.
inline void DeferLanding(cudaStream_t s, std::function<void()> land) {
  if (Legacy(s)) {
    Defer(std::move(land));
    return;
  }
  s->landings.push_back(std::move(land));
  ++s->landings_issued;
}
// Completes the work that an operation on `s` is ordered after: on a non-blocking stream, the
// legacy work it waited for and its own earlier operations' results.
inline void CompleteWorkFor(cudaStream_t s) {
  if (Legacy(s)) {
    CompleteWork();
  } else {
    CompleteWork(s->waited);
    Land(s->id);
  }
}
// Issues device work `op` (a kernel, a GEMM) on `s`: what came before on s completes and `op` is
// deferred (on another stream than the legacy one, it runs when its results land).
inline void Issue(cudaStream_t s, std::function<void()> op) {
  CompleteWorkFor(s);
  DeferLanding(s, std::move(op));
}
}  // namespace eellm_emu
inline cudaError_t cudaDeviceSynchronize() {
  eellm_emu::CompleteAll();
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  static uint64_t created = 0;
  *s = new CUstream_st;
  (*s)->non_blocking = (flags & cudaStreamNonBlocking) != 0;
  if ((*s)->non_blocking) {
    (*s)->id = ++created;
    eellm_emu::NonBlockingStreams()[(*s)->id] = *s;
  }
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s != nullptr && s->non_blocking) {
    eellm_emu::Land(s->id);  // (its work completes, as on the device)
    eellm_emu::NonBlockingStreams().erase(s->id);
  }
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  using eellm_emu::Legacy;
  eellm_emu::CountHostWait(Legacy(s) ? eellm_emu::LegacyPending()
                                     : eellm_emu::LegacyPending(s->waited) ||
                                           eellm_emu::LandingsPending(s->id));
  eellm_emu::CompleteWorkFor(s);
  return cudaSuccess;
}
// Events: host time stamps, and what the stream they were recorded on had issued then.
using cudaEvent_t = struct CUevent_st*;
struct CUevent_st {
  std::chrono::steady_clock::time_point at;
  uint64_t issued = 0;    // legacy work issued before the record (waiting completes it)
  uint64_t stream = 0;    // the id of the non-blocking stream it was recorded on (0: legacy)
  uint64_t landings = 0;  // its results issued before the record
};
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
constexpr unsigned cudaEventDisableTiming = 2;
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
// An event on the legacy stream follows all work issued so far; on another stream, what the stream
// has waited for and its own operations so far.
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  e->at = std::chrono::steady_clock::now();
  const bool legacy = eellm_emu::Legacy(s);
  e->issued = legacy ? eellm_emu::DeferredWork().issued : s->waited;
  e->stream = legacy ? 0 : s->id;
  e->landings = legacy ? 0 : s->landings_issued;
  return cudaSuccess;
}
// Completes what came before the event's record only: work issued after it stays pending. (For an
// event on another stream, the legacy stream's pending work runs first: it may have run before
// the results landed, so a read of them that was not ordered after the event sees stale data.)
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  eellm_emu::CountHostWait(eellm_emu::LegacyPending(e->issued) ||
                           (e->stream != 0 && eellm_emu::LandingsPending(e->stream, e->landings)));
  eellm_emu::CompleteWork(e->issued);
  if (e->stream != 0) {
    eellm_emu::CompleteWork();
    eellm_emu::Land(e->stream, e->landings);
  }
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  if (!eellm_emu::Legacy(s)) s->waited = std::max(s->waited, e->issued);
  if (e->stream == 0 || (!eellm_emu::Legacy(s) && e->stream == s->id)) return cudaSuccess;
  const uint64_t from = e->stream;
  const uint64_t upto = e->landings;
  if (eellm_emu::Legacy(s)) {
    eellm_emu::Defer([from, upto] { eellm_emu::Land(from, upto); });
  } else {
    eellm_emu::Land(from, upto);  // (at once: no later than s's next operation)
  }
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t);
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t);
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}
namespace eellm_emu {
inline int64_t g_malloc_calls = 0;  // cudaMalloc calls so far (tests: no allocation in a step)
}  // namespace eellm_emu
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  ++eellm_emu::g_malloc_calls;
  return eellm_emu::AllocRecorded(eellm_emu::Allocations(), p, bytes);
}
// An 80 GiB device (an H100's): free is what the recorded ranges leave of it.
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = size_t{80} << 30;
  size_t used = 0;
  for (const auto& [p, bytes] : eellm_emu::Allocations()) used += bytes;
  *free_bytes = used < *total_bytes ? *total_bytes - used : 0;
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  eellm_emu::CompleteAll();
  return eellm_emu::FreeRecorded(eellm_emu::Allocations(), p,
                                 "cudaFree of a pointer cudaMalloc did not return");
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  return cudaMalloc(p, bytes);
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
namespace eellm_emu {
// A copy on stream s, made now in its order (after the work s is ordered after). (On a
// non-blocking stream copies and memsets write at once: a read of their result not ordered after
// them is not caught, as it is for NCCL's results; none is issued there.)
inline cudaError_t CopyNow(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                           cudaStream_t s = nullptr) {
  CompleteWorkFor(s);
  const bool ok = kind == cudaMemcpyHostToDevice     ? IsDevice(dst, bytes) && IsHost(src, bytes)
                  : kind == cudaMemcpyDeviceToHost   ? IsHost(dst, bytes) && IsDevice(src, bytes)
                  : kind == cudaMemcpyDeviceToDevice ? IsDevice(dst, bytes) && IsDevice(src, bytes)
                                                     : IsHost(dst, bytes) && IsHost(src, bytes);
  if (!ok) return Misuse("cudaMemcpy between memory of the wrong kinds");
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
}  // namespace eellm_emu
// Synchronous for the host, except device to device; from pageable memory the device's earlier
// work completes first.
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  eellm_emu::CountHostWait((kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToHost) &&
                           eellm_emu::LegacyPending());
  return eellm_emu::CopyNow(dst, src, bytes, kind);
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t stream) {
  if (kind == cudaMemcpyHostToDevice && eellm_emu::IsPinned(src, bytes)) {
    if (!eellm_emu::IsDevice(dst, bytes)) {
      return eellm_emu::Misuse("cudaMemcpyAsync between memory of the wrong kinds");
    }
    eellm_emu::DeferLanding(stream, [=] { std::memmove(dst, src, bytes); });
    return cudaSuccess;
  }
  // (From pageable memory the bytes are staged at once, without waiting for the device; a copy to
  // the host waits.)
  eellm_emu::CountHostWait(kind == cudaMemcpyDeviceToHost && eellm_emu::LegacyPending());
  return eellm_emu::CopyNow(dst, src, bytes, kind, stream);
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                                     size_t width, size_t height, cudaMemcpyKind kind,
                                     cudaStream_t stream) {
  eellm_emu::CompleteWorkFor(stream);
  if (kind != cudaMemcpyDeviceToDevice || width > dpitch || width > spitch) {
    return eellm_emu::Misuse("cudaMemcpy2DAsync: only device to device, width within the pitches");
  }
  if (height > 0 && (!eellm_emu::IsDevice(dst, dpitch * (height - 1) + width) ||
                     !eellm_emu::IsDevice(src, spitch * (height - 1) + width))) {
    return eellm_emu::Misuse("cudaMemcpy2DAsync on memory that is not device memory");
  }
  for (size_t r = 0; r < height; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  }
  return cudaSuccess;
}
namespace eellm_emu {
inline cudaError_t MemsetNow(void* p, int value, size_t bytes) {
  if (!IsDevice(p, bytes)) return Misuse("cudaMemset on memory that is not device memory");
  std::memset(p, value, bytes);
  return cudaSuccess;
}
}  // namespace eellm_emu
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  eellm_emu::CompleteWork();
  return eellm_emu::MemsetNow(p, value, bytes);
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  eellm_emu::CompleteWorkFor(stream);
  return eellm_emu::MemsetNow(p, value, bytes);
}
inline cudaError_t cudaMemset2DAsync(void* p, size_t pitch, int value, size_t width, size_t height,
                                     cudaStream_t stream) {
  eellm_emu::CompleteWorkFor(stream);
  if (height > 0 && !eellm_emu::IsDevice(p, pitch * (height - 1) + width)) {
    return eellm_emu::Misuse("cudaMemset2DAsync on memory that is not device memory");
  }
  for (size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(p) + r * pitch, value, width);
  return cudaSuccess;
}
