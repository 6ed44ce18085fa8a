// Block-wide reductions for the CUDA kernels: every thread passes its value and gets the
// block's result. `scratch` holds blockDim.x values in shared memory; blockDim.x must be a power
// of two. The tree order is fixed, so results are deterministic. Also warp and block votes, and
// the column sums over rows (gradients of gains and biases): blocks of kColTile columns x G row
// groups.
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

// OR of v over the 32 lanes of the calling warp (every lane of the warp must call it).
inline __device__ unsigned WarpOr(unsigned v) {
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Whether v holds on any thread of a one-dimensional block of whole warps (every thread must
// call it; `votes`: shared memory of blockDim.x / 32 entries, free again after the block's next
// barrier following this call).
inline __device__ bool BlockAny(bool v, unsigned* votes) {
  const unsigned any = WarpOr(v ? 1u : 0u);
  if (threadIdx.x % 32 == 0) votes[threadIdx.x / 32] = any;
  __syncthreads();
  unsigned all = 0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) all |= votes[w];
  return all != 0;
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
