// CUDA kernels of the row-wise softmax family: the causal attention softmax and its backward,
// softmax cross-entropy (loss, max probability, weighted gradient; fp32 or bf16 logits, and the
// gradient may overwrite the logits) and the vocabulary-parallel pieces. One block per row (staged
// cross-entropy: a block takes rows in turn, the next row's copies overlapping this row's passes);
// sums in double.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "engine/core/cross_entropy_weight.h"
#include "engine/cuda/async_copy.cuh"
#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void CausalSoftmaxKernel(float* s, float* lse, int tk, int q_offset) {
  __shared__ double dscratch[kBlockReduceScratch];
  __shared__ float fscratch[kBlockReduceScratch];
  const int i = blockIdx.x;
  float* row = s + static_cast<size_t>(i) * tk;
  const int n_keys = q_offset + i + 1;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = BlockMax(mx, fscratch);
  double sum = 0.0;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
    const float e = expf(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  sum = BlockSum(sum, dscratch);
  const float inv = static_cast<float>(1.0 / sum);
  for (int j = threadIdx.x; j < tk; j += blockDim.x) row[j] = j < n_keys ? row[j] * inv : 0.0f;
  if (lse != nullptr && threadIdx.x == 0) lse[i] = mx + static_cast<float>(log(sum));
}

__global__ void ProbsFromLseKernel(float* s, const float* lse, int t) {
  const int i = blockIdx.x;
  float* row = s + static_cast<size_t>(i) * t;
  const float l = lse[i];
  for (int j = threadIdx.x; j < t; j += blockDim.x) row[j] = j <= i ? expf(row[j] - l) : 0.0f;
}

__global__ void SoftmaxBackwardKernel(float* ds, const float* p, int t) {
  __shared__ double scratch[kBlockReduceScratch];
  const int i = blockIdx.x;
  float* row = ds + static_cast<size_t>(i) * t;
  const float* prow = p + static_cast<size_t>(i) * t;
  double dot = 0.0;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += static_cast<double>(prow[j]) * row[j];
  const float d = static_cast<float>(BlockSum(dot, scratch));
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    row[j] = j <= i ? prow[j] * (row[j] - d) : 0.0f;
  }
}

// Rows of at most this many bytes (216 KiB: 55,296 fp32 logits or 110,592 bf16 ones; rows of
// whole 16-byte pieces, 16-byte aligned) are staged in shared memory by cross-entropy: the max,
// sum and gradient passes then read the row once from DRAM instead of three times (a chunk of
// [rows, 32000] logits is far larger than L2, so each pass missed it).
constexpr size_t kStagedRowBytesMax = 216 * 1024;

// 1024 threads a row (fewer for a vocabulary under 4096: at least 4 logits a thread): a staged
// row of 32k fp32 logits (128 KiB) leaves room for one block on an SM, whose threads are then all
// the SM has to keep its loads and exps in flight.
constexpr int kCrossEntropyThreads = 1024;

// Logits a staged chunk holds: whole 16-byte pieces of T, about v / chunks of them.
template <typename T>
__device__ __forceinline__ int StagedChunk(int v, int chunks) {
  constexpr int kPer = 16 / sizeof(T);
  return (v / kPer + chunks - 1) / chunks * kPer;
}

// The row's loss (log-sum-exp minus the target's logit), max probability and weighted gradient
// from lr (global or staged; fp32 or bf16 logits T): max, sum of exps (double, thread j summing
// j, j + blockDim.x, ... in order, then BlockSum) and, per element, exp(x - max) w / sum, minus
// w at the target. kChunks > 0: the staged row arrives in kChunks cp.async groups
// (StagedCrossEntropyKernel), the max pass waits for each in turn, and once the gradient pass is
// done with a chunk, `refill(k)` starts the next row's copies into it. exps (a staged fp32 row,
// or null): the sum pass leaves each exp(x - max) there for the gradient pass (the same value;
// one exp an element, not two); a bf16 row has no room for them, and its gradient pass computes
// each exp again (the same bits).
template <int kChunks, typename T, typename Refill>
__device__ __forceinline__ void CrossEntropyRow(size_t r, const T* lr, float* exps, float* losses,
                                                float* max_prob, Elems dlogits,
                                                const int32_t* targets, const float* weights,
                                                bool by_confidence, int v, double* dscratch,
                                                float* fscratch, Refill refill) {
  const int chunk = kChunks > 0 ? StagedChunk<T>(v, kChunks) : v;  // logits a chunk
  float mx = -INFINITY;
  for (int k = 0; k < (kChunks > 0 ? kChunks : 1); ++k) {
    if constexpr (kChunks > 0) {
      CpAsyncWaitFor<kChunks>(k);  // this thread's copies of chunks 0 .. k
      __syncthreads();             // everyone's
    }
    const int end = min(v, (k + 1) * chunk);
    for (int j = k * chunk + threadIdx.x; j < end; j += blockDim.x) {
      mx = fmaxf(mx, LoadAsFloat(lr + j));
    }
  }
  // The target's logit, read while the whole row is there (every chunk has landed) and before
  // BlockMax's barriers: past them, the sum pass of another warp may overwrite it with its exp.
  const int target = targets[r];
  const bool valid = target >= 0 && target < v;
  const float target_logit = valid ? LoadAsFloat(lr + target) : NAN;
  mx = BlockMax(mx, fscratch);
  double sum = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float e = expf(LoadAsFloat(lr + j) - mx);
    if (exps != nullptr) exps[j] = e;  // (over the staged logit: this thread's own element)
    sum += e;
  }
  sum = BlockSum(sum, dscratch);  // also orders every read of the row before the writes below
  const float p = static_cast<float>(1.0 / sum);  // the max probability
  if (threadIdx.x == 0) {
    losses[r] = static_cast<float>(log(sum) - (static_cast<double>(target_logit) - mx));
    if (max_prob != nullptr) max_prob[r] = p;
  }
  // fp32 or bf16 (rounded once); each element is read (lr[j]) before the same thread writes it.
  const float w = CrossEntropyRowWeight(weights, r, by_confidence, p);
  const float scale = static_cast<float>(w / sum);
  for (int k = 0; k < (kChunks > 0 ? kChunks : 1); ++k) {
    const int end = min(v, (k + 1) * chunk);
    if (dlogits.data != nullptr) {
      for (int j = k * chunk + threadIdx.x; j < end; j += blockDim.x) {
        const float g = (exps != nullptr ? exps[j] : expf(LoadAsFloat(lr + j) - mx)) * scale;
        StoreAt(dlogits, r * v + j, j == target ? g - w : g);
      }
    }
    if constexpr (kChunks > 0) {
      __syncthreads();  // every thread done with chunk k
      refill(k);
    }
  }
}

// One row a block, read from global memory (rows too long to stage, or not 16-byte aligned).
template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads)
    CrossEntropyKernel(float* losses, float* max_prob, Elems dlogits, const T* logits,
                       const int32_t* targets, const float* weights, bool by_confidence, int v) {
  __shared__ double dscratch[kBlockReduceScratch];
  __shared__ float fscratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  CrossEntropyRow<0>(r, logits + r * v, static_cast<float*>(nullptr), losses, max_prob, dlogits,
                     targets, weights, by_confidence, v, dscratch, fscratch, [](int) {});
}

// Staged rows, pipelined: each block takes rows blockIdx.x, + gridDim.x, ..., its row staged in
// dynamic shared memory in kCeChunks cp.async groups; while it computes a row's gradients, chunk
// by chunk, the next row's copies start into the chunks it is done with, and the next row's max
// pass takes each chunk as it lands. Same passes, threads and order as CrossEntropyKernel: the
// same bits.
constexpr int kCeChunks = 4;
template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads)
    StagedCrossEntropyKernel(float* losses, float* max_prob, Elems dlogits, const T* logits,
                             const int32_t* targets, const float* weights, bool by_confidence,
                             int n, int v) {
  constexpr int kPer = 16 / sizeof(T);  // logits a 16-byte copy moves
  __shared__ double dscratch[kBlockReduceScratch];
  __shared__ float fscratch[kBlockReduceScratch];
  EE_DYNAMIC_SHARED(smem);
  T* row = reinterpret_cast<T*>(smem);
  float* exps = std::is_same_v<T, float> ? reinterpret_cast<float*>(smem) : nullptr;
  const int chunk = StagedChunk<T>(v, kCeChunks);
  // Chunk k of row r into the stage (a group per chunk, empty or not, for every thread).
  auto load = [&](size_t r, int k) {
    const T* src = logits + r * v;
    const int end = min(v, (k + 1) * chunk);
    for (int j = k * chunk + kPer * threadIdx.x; j < end; j += kPer * blockDim.x) {
      CpAsync16(row + j, src + j, true);
    }
    CpAsyncCommit();
  };
  size_t r = blockIdx.x;
  if (r >= static_cast<size_t>(n)) return;
  for (int k = 0; k < kCeChunks; ++k) load(r, k);
  for (; r < static_cast<size_t>(n); r += gridDim.x) {
    const size_t next = r + gridDim.x;
    CrossEntropyRow<kCeChunks>(r, row, exps, losses, max_prob, dlogits, targets, weights,
                               by_confidence, v, dscratch, fscratch, [&](int k) {
                                 if (next < static_cast<size_t>(n)) load(next, k);
                               });
  }
}

// The largest row the staged kernel takes on this GPU: kStagedRowBytesMax, or less where the
// GPU's shared memory a block may opt into is smaller (163 KiB on an A100, 99 on Ada; 1 KiB left
// for the kernel's static shared memory); 0 where the limit cannot be raised. The kernel's limit
// is raised to it once (a limit set per call could be lowered by another thread's call between
// this one's setting and launch).
template <typename T>
size_t StageBytesMax() {
  static const size_t max_bytes = [] {
    int device = 0, optin = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess ||
        optin <= 1024) {
      cudaGetLastError();
      return size_t{0};
    }
    const size_t bytes = std::min(kStagedRowBytesMax, static_cast<size_t>(optin) - 1024);
    if (cudaFuncSetAttribute(StagedCrossEntropyKernel<T>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) {
      cudaGetLastError();
      return size_t{0};
    }
    return bytes;
  }();
  return max_bytes;
}

// Staged (if the rows fit and are whole aligned 16-byte pieces) or not, for logits of type T.
template <typename T>
cudaError_t LaunchCrossEntropy(float* losses, float* max_prob, Elems dlogits, const T* logits,
                               const int32_t* targets, const float* weights, bool by_confidence,
                               int n, int v, int sms, cudaStream_t s) {
  constexpr int kPer = 16 / sizeof(T);
  const size_t bytes = sizeof(T) * static_cast<size_t>(v);
  const bool staged =
      v % kPer == 0 && bytes <= StageBytesMax<T>() && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const unsigned threads = RowThreads((v + 3) / 4, kCrossEntropyThreads);  // 4+ logits a thread
  if (!staged) {
    LaunchKernel(CrossEntropyKernel<T>, dim3(n), dim3(threads), 0, s, losses, max_prob, dlogits,
                 logits, targets, weights, by_confidence, v);
    return cudaGetLastError();
  }
  // As many blocks as the SMs hold at once (the rows' results do not depend on it).
  int per_sm = 0;
  const cudaError_t o = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, StagedCrossEntropyKernel<T>, static_cast<int>(threads), bytes);
  if (o != cudaSuccess) return o;
  const int blocks = std::min(n, std::max(1, sms) * std::max(1, per_sm));
  LaunchKernel(StagedCrossEntropyKernel<T>, dim3(blocks), dim3(threads), bytes, s, losses, max_prob,
               dlogits, logits, targets, weights, by_confidence, n, v);
  return cudaGetLastError();
}

__global__ void RowMaxKernel(float* row_max, Elems logits, int v) {
  __shared__ float scratch[kBlockReduceScratch];
  const size_t r0 = static_cast<size_t>(blockIdx.x) * v;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, LoadAt(logits, r0 + j));
  mx = BlockMax(mx, scratch);
  if (threadIdx.x == 0) row_max[blockIdx.x] = mx;
}

__global__ void SumExpAndTargetKernel(float* sum_exp, float* target_logit, Elems logits,
                                      const float* row_max, const int32_t* targets, int v,
                                      int start) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x, r0 = r * v;
  double sum = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x)
    sum += expf(LoadAt(logits, r0 + j) - row_max[r]);
  sum = BlockSum(sum, scratch);
  if (threadIdx.x == 0) {
    sum_exp[r] = static_cast<float>(sum);
    const int64_t j = static_cast<int64_t>(targets[r]) - start;
    target_logit[r] = j >= 0 && j < v ? LoadAt(logits, r0 + j) : 0.0f;
  }
}

// One thread a row: the loss from the row's global statistics (see Backend::CrossEntropyFromStats).
__global__ void CrossEntropyFromStatsKernel(float* losses, float* max_prob, const float* row_max,
                                            const float* sum_exp, const float* target_logit,
                                            int n) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const float s = sum_exp[r];
  losses[r] = static_cast<float>(log(static_cast<double>(s)) + row_max[r] - target_logit[r]);
  if (max_prob != nullptr) max_prob[r] = 1.0f / s;
}

__global__ void CrossEntropyGradRangeKernel(Elems dlogits, Elems logits, const float* row_max,
                                            const float* sum_exp, const int32_t* targets,
                                            const float* weights, bool by_confidence, int v,
                                            int start) {
  const size_t r = blockIdx.x, r0 = r * v;
  const float w = CrossEntropyRowWeight(weights, r, by_confidence, 1.0f / sum_exp[r]);
  const float scale = w / sum_exp[r];
  const int64_t target = static_cast<int64_t>(targets[r]) - start;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float g = expf(LoadAt(logits, r0 + j) - row_max[r]) * scale;  // read, then written
    StoreAt(dlogits, r0 + j, j == target ? g - w : g);
  }
}

}  // namespace

cudaError_t CausalSoftmaxRows(float* s, float* lse, int tq, int tk, int q_offset, cudaStream_t st) {
  if (tq > 0 && tk > 0)
    LaunchKernel(CausalSoftmaxKernel, dim3(tq), dim3(RowThreads(tk, kThreads)), 0, st, s, lse, tk,
                 q_offset);
  return cudaGetLastError();
}
cudaError_t ProbsFromLse(float* s, const float* lse, int t, cudaStream_t st) {
  if (t > 0)
    LaunchKernel(ProbsFromLseKernel, dim3(t), dim3(RowThreads(t, kThreads)), 0, st, s, lse, t);
  return cudaGetLastError();
}
cudaError_t SoftmaxBackwardRows(float* ds, const float* p, int t, cudaStream_t st) {
  if (t > 0)
    LaunchKernel(SoftmaxBackwardKernel, dim3(t), dim3(RowThreads(t, kThreads)), 0, st, ds, p, t);
  return cudaGetLastError();
}
cudaError_t CrossEntropy(float* losses, float* max_prob, Elems dlogits, Elems logits,
                         const int32_t* targets, const float* weights, bool by_confidence, int n,
                         int v, int sms, cudaStream_t s) {
  if (n <= 0 || v <= 0) return cudaGetLastError();
  return WithElementType(logits, [&](auto* typed) {
    return LaunchCrossEntropy(losses, max_prob, dlogits, typed, targets, weights, by_confidence, n,
                              v, sms, s);
  });
}
cudaError_t RowMax(float* row_max, Elems logits, int n, int v, cudaStream_t s) {
  if (n > 0 && v > 0)
    LaunchKernel(RowMaxKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, row_max, logits, v);
  return cudaGetLastError();
}
cudaError_t SumExpAndTarget(float* sum_exp, float* target_logit, Elems logits, const float* row_max,
                            const int32_t* targets, int n, int v, int start, cudaStream_t s) {
  if (n > 0 && v > 0) {
    LaunchKernel(SumExpAndTargetKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, sum_exp,
                 target_logit, logits, row_max, targets, v, start);
  }
  return cudaGetLastError();
}
cudaError_t CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                  const float* sum_exp, const float* target_logit, int n,
                                  cudaStream_t s) {
  if (n > 0) {
    LaunchKernel(CrossEntropyFromStatsKernel, dim3((n + kThreads - 1) / kThreads), dim3(kThreads),
                 0, s, losses, max_prob, row_max, sum_exp, target_logit, n);
  }
  return cudaGetLastError();
}
cudaError_t CrossEntropyGradRange(Elems dlogits, Elems logits, const float* row_max,
                                  const float* sum_exp, const int32_t* targets,
                                  const float* weights, bool by_confidence, int n, int v, int start,
                                  cudaStream_t s) {
  if (n > 0 && v > 0) {
    LaunchKernel(CrossEntropyGradRangeKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, dlogits,
                 logits, row_max, sum_exp, targets, weights, by_confidence, v, start);
  }
  return cudaGetLastError();
}

}  // namespace eellm::cuda
