// A CPU emulation of the small part of CUDA that engine/cuda's kernels use, so that their logic
// (indexing, masking, tiling, barriers, online softmax, register layouts of the tensor-core
// instructions) is checked against the CPU backend on every machine, CI included, where no GPU
// exists. It is for tests only and says nothing about speed or register limits. Like the device,
// it refuses launches with more than 48 KiB of dynamic shared memory unless
// cudaFuncSetAttribute raised that kernel's limit (to at most 227 KiB), and misaligned ldmatrix
// and cp.async addresses (warp_mma.h, async_copy.h); tests/CMakeLists.txt adds UBSan's alignment
// check, which aborts at a misaligned vector load or store.
//
// A launch runs the blocks one after another (in index order in even launches, block 0 and then
// the others in reverse in odd ones); the threads of a block are fibers (fiber_switch.h) on the
// calling thread, switched only at barriers: __syncthreads, and the warp-level ones: __syncwarp,
// and each shuffle, ldmatrix or MMA (warp_mma.h). Threads run each to its next barrier, in index
// order in half of the blocks and in reverse index order in the other half (alternating by block
// and by launch), so that a missing barrier between one thread's write and another's read shows up
// in one of the two orders whichever thread writes. A warp passes a warp-level barrier when all its
// live lanes wait there, the block passes __syncthreads when all its live threads do. So warps may
// take different paths between block barriers (a warp may skip work the others do), as on the
// device. The lanes of a warp must wait at the same kind of barrier, else the emulation aborts (a
// divergent barrier is undefined behaviour on the device), and a warp-level one needs all 32 lanes
// of the warp (the kernels' shuffles take full masks). Dynamic shared memory starts as 0xFF bytes
// (NaN as fp32 and bf16), so reading what no thread wrote shows up in the results.
//
// Device pointers are host pointers here; memory, streams, events and the deferred device work
// are in emulated_runtime.h. Include this through the shim headers of this folder
// (cuda_runtime.h, cuda_bf16.h), with EELLM_CUDA_EMULATION defined.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "tests/gpu/emu/emulated_runtime.h"
#include "tests/gpu/emu/fiber_switch.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory: one array per kernel, shared by all threads (the blocks of a launch run
// one after another, so one copy serves them all).
#define __shared__ static

using std::max;
using std::min;
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

namespace eellm_emu {

constexpr size_t kMaxDynamicShared = 227 * 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without the opt-in attribute
// The dynamic shared-memory limit each kernel was raised to with cudaFuncSetAttribute.
inline std::map<const void*, size_t>& SharedOptIn() {
  static std::map<const void*, size_t> m;
  return m;
}
inline size_t SharedLimit(const void* kernel) {
  auto it = SharedOptIn().find(kernel);
  return it == SharedOptIn().end() ? kDefaultDynamicShared : it->second;
}
constexpr size_t kFiberStack = 256 * 1024;
constexpr size_t kExchangeBytes = 64;  // per thread and WarpExchange

enum class Barrier { kNone, kBlock, kWarp, kShuffle };

struct Fiber {
  void* sp = nullptr;             // saved stack pointer while switched out
  std::unique_ptr<char[]> stack;  // uninitialised: only the pages used are touched
  dim3 tid;
  bool done = false;
  Barrier waiting = Barrier::kNone;
};

// cp.async copies of one thread (async_copy.h): started ones land at the wait that covers them.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};
struct ThreadCopies {
  std::vector<PendingCopy> open;                   // started since the last commit
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
};

struct Scheduler {
  void* main_sp = nullptr;
  bool in_fiber = false;  // false while threads run as plain calls (see Run)
  std::vector<Fiber> fibers;
  int current = 0;
  std::function<void()> body;
  std::vector<unsigned char> shared;  // dynamic shared memory of the running block
  unsigned char* shared_base = nullptr;
  size_t shared_size = 0;  // the launch's dynamic shared memory, from shared_base
  // WarpExchange's slots: two sets of kExchangeBytes per thread, used alternately by each thread
  // (its phase), so one barrier per exchange suffices.
  std::vector<unsigned char> exchange[2];
  std::vector<unsigned char> exchange_phase;
  std::vector<ThreadCopies> async_copies;  // per thread, emptied when a block starts
  bool async_used = false;                 // whether a thread of the block started a copy
  unsigned long launches = 0;              // launches so far (which order a block's threads run)
};

inline Scheduler& Sched() {
  static Scheduler s;
  return s;
}

// The coordinates of the running fiber (set by the scheduler before every switch to it).
inline dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

inline void Yield(Barrier kind) {
  Scheduler& s = Sched();
  if (!s.in_fiber) {
    std::fprintf(stderr,
                 "CUDA emulation: a barrier in a kernel whose thread 0 finished without one\n");
    std::abort();
  }
  s.fibers[s.current].waiting = kind;
  eellm_emu_switch(&s.fibers[s.current].sp, s.main_sp);
}

inline void FiberEntry() {
  Scheduler& s = Sched();
  s.body();
  s.fibers[s.current].done = true;
  void* unused;
  eellm_emu_switch(&unused, s.main_sp);  // never resumed
}

inline int LinearThread() {
  return static_cast<int>(g_thread_idx.x +
                          g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z));
}

// Called when no thread of the block can run: releases the warps whose live lanes all wait at a
// warp-level barrier (a shuffle, __syncwarp, a warp-collective load or MMA), else (every live
// thread then waits at __syncthreads) all of them. Returns false when every thread has finished;
// aborts when the lanes of a warp wait at different barriers, or at a warp-level one while some
// of its 32 lanes have exited or do not exist.
inline bool ReleaseBarriers(int threads) {
  Scheduler& s = Sched();
  bool alive = false, released = false;
  for (int w0 = 0; w0 < threads; w0 += 32) {
    const int w1 = std::min(threads, w0 + 32);
    Barrier kind = Barrier::kNone;  // where the warp's live lanes wait
    bool mixed = false, exited = false;
    for (int i = w0; i < w1; ++i) {
      const Fiber& f = s.fibers[i];
      if (f.done) {
        exited = true;
        continue;
      }
      alive = true;
      if (kind == Barrier::kNone) {
        kind = f.waiting;
      } else if (f.waiting != kind) {
        mixed = true;
      }
    }
    if (mixed) {
      std::fprintf(stderr, "CUDA emulation: the lanes of a warp reached different barriers\n");
      std::abort();
    }
    // The warp-level operations here name all 32 lanes (full masks, .aligned instructions): a
    // lane that has exited or lies past the block's end makes them undefined on the device.
    if ((kind == Barrier::kShuffle || kind == Barrier::kWarp) && (exited || w1 - w0 < 32)) {
      std::fprintf(stderr,
                   "CUDA emulation: a warp-level operation (shuffle, __syncwarp, ldmatrix, MMA) "
                   "in warp %d while %s\n",
                   w0 / 32, exited ? "some of its lanes have exited" : "the block ends inside it");
      std::abort();
    }
    if (kind != Barrier::kNone && kind != Barrier::kBlock) {
      for (int i = w0; i < w1; ++i) s.fibers[i].waiting = Barrier::kNone;
      released = true;
    }
  }
  if (released || !alive) return released;
  for (int i = 0; i < threads; ++i) s.fibers[i].waiting = Barrier::kNone;  // all at __syncthreads
  return true;
}

// Runs body() for every thread of every block of the grid. When thread 0 of the first block
// finishes without reaching a barrier, the kernel has none (barriers must be reached by all
// threads), and every other thread runs as a plain call, without fibers.
// (LaunchKernel checked the launch configuration and the dynamic shared memory.)
inline void Run(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  Scheduler& s = Sched();
  s.body = std::move(body);
  // Grow only: shrinking would free fiber stacks that the next larger launch allocates again.
  if (s.fibers.size() < static_cast<size_t>(threads)) s.fibers.resize(threads);
  // (Whole warps: a partial last warp's exchanges read slots of lanes that do not exist.)
  const size_t warp_threads = static_cast<size_t>(threads + 31) / 32 * 32;
  for (auto& slots : s.exchange) slots.assign(warp_threads * kExchangeBytes, 0);
  s.exchange_phase.assign(threads, 0);
  if (s.async_copies.size() < static_cast<size_t>(threads)) s.async_copies.resize(threads);
  s.shared.assign(shared_bytes + 128, 0xFF);
  s.shared_size = shared_bytes;
  s.shared_base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(s.shared.data()) + 127) / 128 * 128);
  g_block_dim = block;
  g_grid_dim = grid;
  bool barriers = true;
  const unsigned long launch = s.launches++;
  // Blocks in index order in even launches; in odd ones block 0 and then the others in reverse (a
  // block that reads what another block of the same launch writes has no order to rely on). Block
  // 0 runs first: whether its thread 0 reaches a barrier says whether the kernel has any.
  const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
  for (unsigned long run = 0; run < blocks; ++run) {
    const unsigned long block_index = launch % 2 == 0 || run == 0 ? run : blocks - run;
    const unsigned bx = block_index % grid.x, by = (block_index / grid.x) % grid.y,
                   bz = block_index / (static_cast<unsigned long>(grid.x) * grid.y);
    g_block_idx = dim3(bx, by, bz);
    std::fill(s.shared.begin(), s.shared.end(), 0xFF);
    if (s.async_used) {  // (emptied, not rebuilt: a deque allocates when constructed)
      for (ThreadCopies& t : s.async_copies) t.open.clear(), t.committed.clear();
      s.async_used = false;
    }
    if (!barriers) {
      for (int i = 0; i < threads; ++i) {
        g_thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
        s.body();
      }
      continue;
    }
    for (int i = 0; i < threads; ++i) {
      Fiber& f = s.fibers[i];
      if (!f.stack) f.stack.reset(new char[kFiberStack]);
      f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      f.done = false;
      f.waiting = Barrier::kNone;
      f.sp = PrepareFiberStack(f.stack.get(), kFiberStack, FiberEntry);
    }
    s.in_fiber = true;
    const bool reverse = ((launch + block_index) & 1) != 0;
    for (bool first = true;; first = false) {
      for (int k = 0; k < threads; ++k) {  // every thread that may run, to its next barrier
        const int i = reverse ? threads - 1 - k : k;
        Fiber& f = s.fibers[i];
        if (f.done || f.waiting != Barrier::kNone) continue;
        s.current = i;
        g_thread_idx = f.tid;
        eellm_emu_switch(&s.main_sp, f.sp);
        if (f.done && first && i == 0 && run == 0) barriers = false;
      }
      if (!ReleaseBarriers(threads)) break;  // every thread has finished
    }
    s.in_fiber = false;
  }
}

inline unsigned char* DynamicShared() { return Sched().shared_base; }

// Publishes `mine` in the calling lane's slot and waits until every lane of the warp has
// published; returns the warp's slots (lane l's value at l * kExchangeBytes). One barrier: a
// lane's next exchange writes the other set of slots, which no lane still reads.
template <typename T>
const unsigned char* PublishToWarp(const T& mine) {
  static_assert(sizeof(T) <= kExchangeBytes, "exchange of a large type");
  Scheduler& s = Sched();
  const int me = LinearThread();
  std::vector<unsigned char>& slots = s.exchange[s.exchange_phase[me]];
  std::memcpy(&slots[static_cast<size_t>(me) * kExchangeBytes], &mine, sizeof(T));
  Yield(Barrier::kShuffle);  // every lane has written
  s.exchange_phase[me] ^= 1;
  return &slots[static_cast<size_t>(me & ~31) * kExchangeBytes];
}

// A warp-collective exchange (the emulation of the instructions that read other lanes'
// registers: ldmatrix and MMA in warp_mma.h): every lane of the warp publishes `mine`; on return
// all[l] is lane l's value.
template <typename T>
void WarpExchange(const T& mine, T (&all)[32]) {
  const unsigned char* slots = PublishToWarp(mine);
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], slots + l * kExchangeBytes, sizeof(T));
}

// A shuffle: every lane of the warp publishes `mine` and gets lane `src`'s value.
template <typename T>
T WarpRead(const T& mine, int src) {
  const unsigned char* slots = PublishToWarp(mine);
  T v;
  std::memcpy(&v, slots + src * kExchangeBytes, sizeof(T));
  return v;
}

// Whether [p, p + bytes) lies in the running block's dynamic shared memory.
inline bool InDynamicShared(const void* p, size_t bytes) {
  const Scheduler& s = Sched();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= s.shared_base && c + bytes <= s.shared_base + s.shared_size;
}

}  // namespace eellm_emu

#define threadIdx (::eellm_emu::g_thread_idx)
#define blockIdx (::eellm_emu::g_block_idx)
#define blockDim (::eellm_emu::g_block_dim)
#define gridDim (::eellm_emu::g_grid_dim)

inline void __syncthreads() { eellm_emu::Yield(eellm_emu::Barrier::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { eellm_emu::Yield(eellm_emu::Barrier::kWarp); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  return eellm_emu::WarpRead(value, (eellm_emu::LinearThread() & 31) ^ lane_mask);
}

template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                        size_t value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize ||
      value > eellm_emu::kMaxDynamicShared) {
    return cudaErrorInvalidValue;
  }
  eellm_emu::SharedOptIn()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// Blocks of `kernel` an SM holds at once, as the device would count them by threads (2,048 an
// SM), blocks (32) and shared memory (228 KiB, 1 KiB reserved a block; the kernel's static
// shared memory is not seen here); registers are not modelled.
template <typename... Params>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks,
                                                                 void (*kernel)(Params...),
                                                                 int threads,
                                                                 size_t dynamic_bytes) {
  (void)kernel;
  if (blocks == nullptr || threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  const size_t by_smem = (228 * 1024) / (dynamic_bytes + 1024);
  *blocks = static_cast<int>(std::min<size_t>({32, static_cast<size_t>(2048 / threads), by_smem}));
  return cudaSuccess;
}

namespace eellm_emu {
// Whether T is a struct whose `data` member is a pointer (the kernels' Elems: fp32 or bf16 data).
template <typename T, typename = void>
struct HasDataPointer : std::false_type {};
template <typename T>
struct HasDataPointer<T, std::void_t<decltype(std::declval<const T&>().data)>>
    : std::is_pointer<decltype(std::declval<const T&>().data)> {};

// Whether a kernel argument may be passed: pointers, and the data pointers of Elems-like
// structs, must be null or point into device memory.
template <typename T>
bool DeviceArgument(const T& arg) {
  if constexpr (std::is_pointer_v<T>) {
    return arg == nullptr || IsDevice(arg, 1);
  } else if constexpr (std::is_class_v<T> && HasDataPointer<T>::value) {
    return arg.data == nullptr || IsDevice(arg.data, 1);
  } else {
    return true;
  }
}
}  // namespace eellm_emu

// The launch of engine/cuda/kernel_launch.h, emulated.
template <typename... Params, typename... Args>
inline cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                                cudaStream_t stream, Args... args) {
  if (!(eellm_emu::DeviceArgument(args) && ...)) {
    eellm_emu::g_last_error = eellm_emu::Misuse("a kernel argument points to host memory");
    return eellm_emu::g_last_error;
  }
  if (shared > eellm_emu::SharedLimit(reinterpret_cast<const void*>(kernel))) {
    eellm_emu::g_last_error = eellm_emu::Misuse(
        "more dynamic shared memory than the kernel's limit (48 KiB unless raised with "
        "cudaFuncSetAttribute)");
    return eellm_emu::g_last_error;
  }
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    eellm_emu::g_last_error = cudaErrorInvalidValue;
    return eellm_emu::g_last_error;
  }
  // (The arguments are copied now, as a launch does; the kernel runs when its work completes.)
  eellm_emu::Issue(stream, [=] { eellm_emu::Run(grid, block, shared, [=] { kernel(args...); }); });
  return cudaSuccess;
}
#define EE_DYNAMIC_SHARED(name) unsigned char* name = ::eellm_emu::DynamicShared()
