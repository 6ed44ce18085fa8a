// Block-wide reductions for the CUDA kernels: every thread passes its value and gets the
// block's result. `scratch` holds blockDim.x values in shared memory; blockDim.x must be a power
// of two. The tree order is fixed, so results are deterministic. Also the column sums over rows
// (gradients of gains and biases): blocks of kColTile columns x G row groups.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eellm::cuda {

inline __device__ double BlockSum(double v, double* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) scratch[threadIdx.x] += scratch[threadIdx.x + w];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

inline __device__ float BlockMax(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w)
      scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + w]);
    __syncthreads();
  }
  const float m = scratch[0];
  __syncthreads();
  return m;
}

// Column sums: blockDim = (kColTile, ColumnRowGroups(n)), one block per kColTile columns; a warp
// reads 16 consecutive columns (64 bytes) of two rows at a time. Thread (x, y) sums rows y,
// y + G, ... of its column in order, then ColumnGroupSum adds the G partials.
constexpr int kColTile = 16;
constexpr int kMaxRowGroups = 64;
constexpr int kColMaxThreads = kColTile * kMaxRowGroups;  // 1024

// The number of row groups G for n rows: a power of two, the largest up to kMaxRowGroups that
// leaves each group at least 8 rows (1 when n < 16), so that short sums launch no idle threads.
inline unsigned ColumnRowGroups(int n) {
  unsigned g = 1;
  while (g < kMaxRowGroups && 16 * static_cast<int64_t>(g) <= n) g *= 2;
  return g;
}

// The sum over the block's row groups of each thread's `v`, for its column, by a fixed pairwise
// tree in `part` (shared, [kMaxRowGroups][kColTile]); valid in row group 0. Every thread of the
// block must call it.
inline __device__ double ColumnGroupSum(double v, double (*part)[kColTile]) {
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.y / 2; w > 0; w >>= 1) {
    if (threadIdx.y < w) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + w][threadIdx.x];
    __syncthreads();
  }
  const double total = part[0][threadIdx.x];
  __syncthreads();  // part is reused by the next call
  return total;
}

}  // namespace eellm::cuda
