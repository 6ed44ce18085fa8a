// CUDA kernels of the row-wise softmax family: the causal attention softmax and its backward,
// softmax cross-entropy (loss, max probability, weighted gradient; the gradient may overwrite
// the logits) and the vocabulary-parallel pieces. One block per row; sums in double.
#include <cmath>

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

// Rows of at most this many logits (216 KiB, v a multiple of 4) are staged in shared memory by
// cross-entropy: the max, sum and gradient passes then read the row once from DRAM instead of
// three times (a chunk of [rows, 32000] fp32 logits is far larger than L2, so each pass missed it).
constexpr int kStagedVocabMax = 54 * 1024;

// kStaged: the row is first copied to dynamic shared memory (cp.async, 16 bytes per copy; v % 4
// == 0, 16-byte aligned rows), and the passes read it there. Same threads, same order: the
// results are the same bits either way.
// 1024 threads a row (fewer for a vocabulary under 4096: at least 4 logits a thread): a staged
// row of 32k logits (128 KiB) leaves room for one block on an SM, whose threads are then all the
// SM has to keep its loads and exps in flight.
constexpr int kCrossEntropyThreads = 1024;

template <bool kStaged>
__global__ void __launch_bounds__(kCrossEntropyThreads)
    CrossEntropyKernel(float* losses, float* max_prob, Elems dlogits, const float* logits,
                       const int32_t* targets, const float* weights, int v) {
  __shared__ double dscratch[kBlockReduceScratch];
  __shared__ float fscratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* lr = logits + r * v;
  if constexpr (kStaged) {
    EE_DYNAMIC_SHARED(smem);
    float* row = reinterpret_cast<float*>(smem);
    for (int j = 4 * threadIdx.x; j < v; j += 4 * blockDim.x) CpAsync16(row + j, lr + j, true);
    CpAsyncCommit();
    CpAsyncWait<0>();
    __syncthreads();
    lr = row;
  }
  const int target = targets[r];
  const bool valid = target >= 0 && target < v;
  const float target_logit = valid ? lr[target] : NAN;  // read before dlogits may overwrite
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, lr[j]);
  mx = BlockMax(mx, fscratch);
  double sum = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(lr[j] - mx);
  sum = BlockSum(sum, dscratch);  // also orders every read of the row before the writes below
  if (threadIdx.x == 0) {
    losses[r] = static_cast<float>(log(sum) - (static_cast<double>(target_logit) - mx));
    if (max_prob != nullptr) max_prob[r] = static_cast<float>(1.0 / sum);
  }
  if (dlogits.data == nullptr) return;
  // fp32 or bf16 (rounded once); each element is read (lr[j]) before the same thread writes it.
  const float w = weights != nullptr ? weights[r] : 1.0f;
  const float scale = static_cast<float>(w / sum);
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float g = expf(lr[j] - mx) * scale;
    StoreAt(dlogits, r * v + j, j == target ? g - w : g);
  }
}

__global__ void RowMaxKernel(float* row_max, const float* logits, int v) {
  __shared__ float scratch[kBlockReduceScratch];
  const float* lr = logits + static_cast<size_t>(blockIdx.x) * v;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, lr[j]);
  mx = BlockMax(mx, scratch);
  if (threadIdx.x == 0) row_max[blockIdx.x] = mx;
}

__global__ void SumExpAndTargetKernel(float* sum_exp, float* target_logit, const float* logits,
                                      const float* row_max, const int32_t* targets, int v,
                                      int start) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* lr = logits + r * v;
  double sum = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(lr[j] - row_max[r]);
  sum = BlockSum(sum, scratch);
  if (threadIdx.x == 0) {
    sum_exp[r] = static_cast<float>(sum);
    const int64_t j = static_cast<int64_t>(targets[r]) - start;
    target_logit[r] = j >= 0 && j < v ? lr[j] : 0.0f;
  }
}

__global__ void CrossEntropyGradRangeKernel(Elems dlogits, const float* logits,
                                            const float* row_max, const float* sum_exp,
                                            const int32_t* targets, const float* weights, int v,
                                            int start) {
  const size_t r = blockIdx.x;
  const float* lr = logits + r * v;
  const float w = weights != nullptr ? weights[r] : 1.0f;
  const float scale = w / sum_exp[r];
  const int64_t target = static_cast<int64_t>(targets[r]) - start;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float g = expf(lr[j] - row_max[r]) * scale;
    StoreAt(dlogits, r * v + j, j == target ? g - w : g);
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
cudaError_t CrossEntropy(float* losses, float* max_prob, Elems dlogits, const float* logits,
                         const int32_t* targets, const float* weights, int n, int v,
                         cudaStream_t s) {
  if (n > 0 && v > 0) {
    const bool staged =
        v % 4 == 0 && v <= kStagedVocabMax && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
    const unsigned threads = RowThreads((v + 3) / 4, kCrossEntropyThreads);  // 4+ logits a thread
    if (staged) {
      const size_t bytes = sizeof(float) * v;
      const cudaError_t e = cudaFuncSetAttribute(
          CrossEntropyKernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (e != cudaSuccess) return e;
      LaunchKernel(CrossEntropyKernel<true>, dim3(n), dim3(threads), bytes, s, losses, max_prob,
                   dlogits, logits, targets, weights, v);
    } else {
      LaunchKernel(CrossEntropyKernel<false>, dim3(n), dim3(threads), 0, s, losses, max_prob,
                   dlogits, logits, targets, weights, v);
    }
  }
  return cudaGetLastError();
}
cudaError_t RowMax(float* row_max, const float* logits, int n, int v, cudaStream_t s) {
  if (n > 0 && v > 0)
    LaunchKernel(RowMaxKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, row_max, logits, v);
  return cudaGetLastError();
}
cudaError_t SumExpAndTarget(float* sum_exp, float* target_logit, const float* logits,
                            const float* row_max, const int32_t* targets, int n, int v, int start,
                            cudaStream_t s) {
  if (n > 0 && v > 0) {
    LaunchKernel(SumExpAndTargetKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, sum_exp,
                 target_logit, logits, row_max, targets, v, start);
  }
  return cudaGetLastError();
}
cudaError_t CrossEntropyGradRange(Elems dlogits, const float* logits, const float* row_max,
                                  const float* sum_exp, const int32_t* targets,
                                  const float* weights, int n, int v, int start, cudaStream_t s) {
  if (n > 0 && v > 0) {
    LaunchKernel(CrossEntropyGradRangeKernel, dim3(n), dim3(RowThreads(v, kThreads)), 0, s, dlogits,
                 logits, row_max, sum_exp, targets, weights, v, start);
  }
  return cudaGetLastError();
}

}  // namespace eellm::cuda
