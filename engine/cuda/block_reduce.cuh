// Block-wide reductions for the CUDA kernels: every thread passes its value and gets the
// block's result. `scratch` holds kBlockReduceScratch values in shared memory; blockDim.x must be
// a multiple of 32. The order is fixed, so results are deterministic. Also warp and block votes,
// and the column sums over rows (gradients of gains and biases): blocks of kColTile columns x G row
// groups.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace eellm::cuda {

// Shared memory that BlockSum and BlockMax need: one value per warp of the block.
constexpr int kBlockReduceScratch = 32;

// Threads of a block that reduces one row: whole warps enough for `items` (the row's elements,
// or its groups of columns that one thread takes at a time), at most max_threads, so that short
// rows (a tiny model's hidden size or vocabulary) launch no idle warps.
inline unsigned RowThreads(int64_t items, int max_threads) {
  const int64_t threads = (items + 31) / 32 * 32;
  return static_cast<unsigned>(threads < 32 ? 32 : (threads > max_threads ? max_threads : threads));
}

// The sum over the block (blockDim.x a multiple of 32, at most 1024): each warp adds its lanes
// in a fixed butterfly (every lane gets the same bits: a + b = b + a), then every thread adds
// the warps' sums in warp order. Two barriers; the second frees scratch for the next call, and
// both order the block's reads before the writes that follow.
inline __device__ double BlockSum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Two sums over the block at once (a and b), as BlockSum adds each: the same bits, one barrier
// pair. `scratch` holds 2 kBlockReduceScratch values.
inline __device__ void BlockSum2(double& a, double& b, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (threadIdx.x % 32 == 0) {
    scratch[threadIdx.x / 32] = a;
    scratch[kBlockReduceScratch + threadIdx.x / 32] = b;
  }
  __syncthreads();
  a = b = 0.0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) {
    a += scratch[w];
    b += scratch[kBlockReduceScratch + w];
  }
  __syncthreads();
}

inline __device__ float BlockMax(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = -INFINITY;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}

// Column sums: blockDim = (kColTile, ColumnRowGroups(rows of a slice)), gridDim = (one block per
// kColTile columns, ColumnSlices); a warp reads 16 consecutive columns (64 bytes) of two rows at
// a time. Block (x, s) takes the s-th slice of rows (ColumnSliceRows each); its thread (x, y)
// sums the slice's rows y, y + G, ... of its column in order, then ColumnGroupSum adds the G
// partials. With one slice the block adds its sums to the output; with several it writes them,
// [slices, cols] in double, and AddColumnPartials (cuda_kernels.h) adds them to the output by the
// same scheme (groups of slices in order, the groups by a fixed tree).
constexpr int kColTile = 16;
constexpr int kMaxRowGroups = 64;
constexpr int kColMaxThreads = kColTile * kMaxRowGroups;  // 1024
// Blocks a column sum aims for: 2 per SM on an H100/H200 (132 SMs) at 1,024 threads each. A
// norm's gains over a hidden size of 2,048 are 128 column blocks, a q/k norm's over a head of
// 128 only 8: their rows are split into slices until the blocks reach this.
constexpr int kColTargetBlocks = 256;
// Rows a slice keeps at least (16 row groups of 16 rows).
constexpr int kColMinSliceRows = 256;

// The number of row groups G for n rows: a power of two, the largest up to kMaxRowGroups that
// leaves each group at least 8 rows (1 when n < 16), so that short sums launch no idle threads.
inline unsigned ColumnRowGroups(int n) {
  unsigned g = 1;
  while (g < kMaxRowGroups && 16 * static_cast<int64_t>(g) <= n) g *= 2;
  return g;
}

// The number of row slices of a sum over n rows of `cols` columns.
inline int ColumnSlices(int n, int cols) {
  const int64_t col_blocks = (cols + kColTile - 1) / kColTile;
  const int64_t want = (kColTargetBlocks + col_blocks - 1) / col_blocks;
  const int64_t most = n / kColMinSliceRows;
  return static_cast<int>(want < most ? want : (most > 1 ? most : 1));
}
// Rows per slice (the last slice may hold fewer).
inline int ColumnSliceRows(int n, int slices) { return (n + slices - 1) / slices; }

// The block's result for its column (thread (x, 0) of a block, j < cols): added to dst[j], or
// with several slices written to this slice's partials.
inline __device__ void StoreColumnSum(float* dst, double* partials, double total, int j, int cols) {
  if (gridDim.y == 1) {
    dst[j] += static_cast<float>(total);
  } else {
    partials[static_cast<size_t>(blockIdx.y) * cols + j] = total;
  }
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
