// CUDA kernels of the elementwise, reduction, embedding (its gradient: embedding_backward.cu),
// bias, activation, RoPE and AdamW ops. Reductions are deterministic: fixed blocks summed in a
// fixed order (no atomics); bias gradients are column sums in double: row group y of a block sums
// rows y, y + G, ... in order, and the G groups' partials are added in a fixed pairwise tree.
#include <cmath>

#include "engine/core/adamw_update.h"
#include "engine/core/dropout.h"
#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;

unsigned Blocks(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (size_t{1} << 20) ? (b > 0 ? b : 1) : (size_t{1} << 20));
}

#define GRID_STRIDE(i, n)                                                 \
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < (n); \
       i += size_t{gridDim.x} * blockDim.x)

// Groups of 8 elements (element_io.cuh's Load8 / Store8): i0 = 8 * the thread's group index;
// GroupCount(n, i0) of them exist (the last group may be short).
#define GRID_STRIDE_GROUPS(i0, n)                                                 \
  for (size_t i0 = 8 * (blockIdx.x * size_t{blockDim.x} + threadIdx.x); i0 < (n); \
       i0 += 8 * size_t{gridDim.x} * blockDim.x)
__device__ __forceinline__ int GroupCount(size_t n, size_t i0) {
  return n - i0 < 8 ? static_cast<int>(n - i0) : 8;
}
unsigned GroupBlocks(size_t n) { return Blocks((n + 7) / 8); }

__global__ void FillKernel(float* x, size_t n, float v) { GRID_STRIDE(i, n) x[i] = v; }
// x[i] uniform in [-scale, scale) from a hash of (seed, i) (benchmark data: not all equal).
__global__ void FillUniformKernel(float* x, size_t n, uint32_t seed, float scale) {
  GRID_STRIDE(i, n) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15;
    h *= 0x85EBCA77u;
    h ^= h >> 13;
    h *= 0xC2B2AE3Du;
    h ^= h >> 16;
    x[i] = scale * (static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}
// bf16 bits of x (round to nearest even; NaN stays NaN).
__device__ __forceinline__ uint16_t Bf16Bits(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x7fffffffu) > 0x7f800000u
             ? static_cast<uint16_t>((u >> 16) | 0x40)
             : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__global__ void ToBf16Kernel(uint16_t* out, const float* x, size_t n) {
  GRID_STRIDE(i, n) out[i] = Bf16Bits(x[i]);
}
// x [rows, cols] into rows of out `out_stride` elements apart.
__global__ void ToBf16RowsKernel(uint16_t* out, size_t out_stride, const float* x, int cols,
                                 size_t n) {
  GRID_STRIDE(i, n) {
    const size_t r = i / cols;
    out[r * out_stride + (i - r * cols)] = Bf16Bits(x[i]);
  }
}
__global__ void AddKernel(float* y, const float* a, const float* b, size_t n) {
  GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}
__global__ void AxpyKernel(float* y, float alpha, const float* x, size_t n) {
  GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
__global__ void ScaleKernel(Elems x, float alpha, size_t n) {
  GRID_STRIDE(i, n) StoreAt(x, i, LoadAt(x, i) * alpha);
}
__global__ void ToFloatKernel(Elems out, Elems in, size_t n, bool vec) {
  GRID_STRIDE_GROUPS(i0, n) {
    float v[8];
    Load8(in, i0, GroupCount(n, i0), vec, v);
    Store8(out, i0, GroupCount(n, i0), vec, v);
  }
}

// One CUDA block per reduction block: partial[blockIdx.x] = sum of squares (double) of
// blocks[blockIdx.x], or without a table of elements [blockIdx.x, blockIdx.x + 1) kSquaresBlock.
__global__ void SumSquaresKernel(double* partial, const float* x, size_t n,
                                 const SquaresBlock* blocks) {
  __shared__ double acc[kThreads];
  size_t begin = blockIdx.x * kSquaresBlock;
  size_t end = begin + kSquaresBlock < n ? begin + kSquaresBlock : n;
  if (blocks != nullptr) {
    begin = blocks[blockIdx.x].begin;
    end = blocks[blockIdx.x].end;
  }
  double s = 0.0;
  for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    s += static_cast<double>(x[i]) * x[i];
  }
  acc[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

__global__ void EmbeddingForwardKernel(float* out, const int32_t* ids, const float* table, int n,
                                       int c, int start, int rows) {
  GRID_STRIDE(i, size_t{static_cast<size_t>(n)} * c) {
    const size_t t = i / c, j = i % c;
    const int64_t row = static_cast<int64_t>(ids[t]) - start;
    out[i] = row >= 0 && row < rows ? table[static_cast<size_t>(row) * c + j] : 0.0f;
  }
}

__global__ void EmbeddingAddKernel(float* out, const int32_t* ids, const float* table, int n,
                                   int c) {
  GRID_STRIDE(i, size_t{static_cast<size_t>(n)} * c) {
    const size_t t = i / c, j = i % c;
    out[i] += table[static_cast<size_t>(ids[t]) * c + j];
  }
}

// The operands of the kernels below (activations, their gradients) are fp32 or bf16 Elems.
// out = in + bias, the bias in out's dtype (rounded to bf16 for a bf16 out, as cuBLASLt's bias
// epilogue adds it); out may alias in.
__global__ void AddBiasKernel(Elems out, Elems in, const float* bias, int n, int cols) {
  GRID_STRIDE(i, static_cast<size_t>(n) * cols) {
    const float b = bias[i % cols];
    StoreAt(out, i, LoadAt(in, i) + (out.bf16 ? __bfloat162float(__float2bfloat16(b)) : b));
  }
}

// dst[j] += sum over rows of x[r, j] (double), in the fixed order of block_reduce.cuh's column
// sums (`partials` when sliced).
__global__ void __launch_bounds__(kColMaxThreads, 2)
    ColumnSumAddKernel(float* dst, double* partials, Elems x, int n, int slice_rows, int cols) {
  __shared__ double part[kMaxRowGroups][kColTile];
  const int j = blockIdx.x * kColTile + threadIdx.x;
  const int begin = blockIdx.y * slice_rows, end = min(n, begin + slice_rows);
  double acc = 0.0;
  if (j < cols) {
    for (int r = begin + threadIdx.y; r < end; r += blockDim.y)
      acc += LoadAt(x, static_cast<size_t>(r) * cols + j);
  }
  const double total = ColumnGroupSum(acc, part);
  if (threadIdx.y == 0 && j < cols) StoreColumnSum(dst, partials, total, j, cols);
}

__global__ void CopyRowsToPoolsKernel(uint4* k_pool, uint4* v_pool, const uint4* k, const uint4* v,
                                      const int32_t* pool_rows, size_t n_words, int row_words,
                                      int src_words) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n_words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / row_words, word = i % row_words;
    const int32_t to = pool_rows[row];
    if (to < 0) continue;
    const size_t at = static_cast<size_t>(to) * row_words + word, from = row * src_words + word;
    k_pool[at] = k[from];
    v_pool[at] = v[from];
  }
}

// dst[j] += the sum of partials[s][j] over s: blocks of kColTile columns x G groups of slices
// (ColumnRowGroups), group y adding slices y, y + G, ... in order, the groups by a fixed tree.
// blockIdx.y 1: the second sum (dst2, its partials after the first's).
__global__ void __launch_bounds__(kColMaxThreads)
    AddColumnPartialsKernel(float* dst, float* dst2, const double* partials, int slices, int cols) {
  __shared__ double part[kMaxRowGroups][kColTile];
  if (blockIdx.y == 1) {
    dst = dst2;
    partials += static_cast<size_t>(slices) * cols;
  }
  const int j = blockIdx.x * kColTile + threadIdx.x;
  double acc = 0.0;
  if (j < cols) {
    for (int s = threadIdx.y; s < slices; s += blockDim.y) {
      acc += partials[static_cast<size_t>(s) * cols + j];
    }
  }
  const double total = ColumnGroupSum(acc, part);
  if (threadIdx.y == 0 && j < cols) dst[j] += static_cast<float>(total);
}

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// GELU, tanh approximation (GPT-2).
__device__ __forceinline__ float Gelu(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

__global__ void GeluForwardKernel(Elems out, Elems x, size_t n, bool vec) {
  GRID_STRIDE_GROUPS(i0, n) {
    float v[8];
    Load8(x, i0, GroupCount(n, i0), vec, v);
    for (float& e : v) e = Gelu(e);
    Store8(out, i0, GroupCount(n, i0), vec, v);
  }
}
// pre = acc + bias (the bias in pre's dtype, as AddBias; bias may be null) and act = gelu of
// it before pre's rounding: what cuBLASLt's GELU_AUX_BIAS epilogue writes.
__global__ void BiasGeluForwardKernel(Elems act, Elems pre, const float* acc, const float* bias,
                                      int n, int cols) {
  GRID_STRIDE(i, static_cast<size_t>(n) * cols) {
    float xi = acc[i];
    if (bias != nullptr) {
      const float b = bias[i % cols];
      xi += pre.bf16 ? __bfloat162float(__float2bfloat16(b)) : b;
    }
    StoreAt(pre, i, xi);
    StoreAt(act, i, Gelu(xi));
  }
}
__global__ void GeluBackwardKernel(Elems dx, Elems dout, Elems x, size_t n, bool vec) {
  GRID_STRIDE_GROUPS(i0, n) {
    const int count = GroupCount(n, i0);
    float xv[8], d[8];
    Load8(x, i0, count, vec, xv);
    Load8(dout, i0, count, vec, d);
    for (int k = 0; k < 8; ++k) {
      const float xi = xv[k];
      const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
      const float th = tanhf(u);
      const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * xi * xi);
      const float grad = 0.5f * (1.0f + th) + 0.5f * xi * (1.0f - th * th) * du;
      d[k] *= grad;
    }
    Store8(dx, i0, count, vec, d);  // dx may alias dout: the same elements, read first
  }
}
__device__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
// Hidden dropout (engine/core/dropout.h): element i of rows from row0 on is (row0 * c + i).
__global__ void DropoutAddKernel(float* out, const float* x, const float* branch, size_t n,
                                 uint64_t base, uint32_t threshold, float scale, uint64_t key) {
  GRID_STRIDE(i, n) {
    const float kept = DropoutKeep(key, base + i, threshold) ? branch[i] * scale : 0.0f;
    out[i] = (x != nullptr ? x[i] : 0.0f) + kept;
  }
}
// SwiGLU's rows of `cols` in groups of 8 (a group never crosses a row): group gi is row
// gi / per_row, columns from 8 (gi % per_row); `dense` is its offset in out and dout, `strided`
// in gate, up, dgate and dup, `count` its valid elements.
struct SwiGluGroup {
  size_t dense, strided;
  int count;
};
__device__ __forceinline__ SwiGluGroup SwiGluGroupAt(size_t gi, unsigned per_row, int cols,
                                                     int stride) {
  const size_t r = gi / per_row;
  const int c0 = static_cast<int>(gi - r * per_row) * 8;
  return {r * cols + c0, r * stride + c0, cols - c0 < 8 ? cols - c0 : 8};
}
__global__ void SwiGluForwardKernel(Elems out, Elems gate, Elems up, int rows, int cols, int stride,
                                    bool vec) {
  const unsigned per_row = (cols + 7) / 8;
  GRID_STRIDE(gi, size_t{per_row} * rows) {
    const SwiGluGroup at = SwiGluGroupAt(gi, per_row, cols, stride);
    float g[8], u[8];
    Load8(gate, at.strided, at.count, vec, g);
    Load8(up, at.strided, at.count, vec, u);
    for (int k = 0; k < 8; ++k) u[k] *= g[k] * Sigmoid(g[k]);
    Store8(out, at.dense, at.count, vec, u);
  }
}
// dgate and dup may alias gate and up: every input of a group is read before its outputs are
// written.
__global__ void SwiGluBackwardKernel(Elems dgate, Elems dup, Elems dout, Elems gate, Elems up,
                                     int rows, int cols, int stride, bool vec) {
  const unsigned per_row = (cols + 7) / 8;
  GRID_STRIDE(gi, size_t{per_row} * rows) {
    const SwiGluGroup at = SwiGluGroupAt(gi, per_row, cols, stride);
    float g[8], u[8], dy[8];
    Load8(gate, at.strided, at.count, vec, g);
    Load8(up, at.strided, at.count, vec, u);
    Load8(dout, at.dense, at.count, vec, dy);
    for (int k = 0; k < 8; ++k) {
      const float s = Sigmoid(g[k]);
      const float dsilu = s * (1.0f + g[k] * (1.0f - s));
      const float dg = dy[k] * u[k] * dsilu;
      u[k] = dy[k] * g[k] * s;  // dup
      g[k] = dg;
    }
    Store8(dgate, at.strided, at.count, vec, g);
    Store8(dup, at.strided, at.count, vec, u);
  }
}

// RoPE in two passes: the rotation's cos and sin per (token, pair index i < head_dim / 2),
// computed once in double as the CPU backend does (table[2 (t half + i)] = cos, + 1 = sin), then
// applied to every head with 8 pairs per thread (Load8 / Store8: x[i0 ..] and x[half + i0 ..]).
__global__ void RopeTableKernel(float* table, const int32_t* pos, int n, int head_dim,
                                RopeParams rope, double sign) {
  const int half = head_dim / 2;
  GRID_STRIDE(k, static_cast<size_t>(n) * half) {
    const int t = static_cast<int>(k / half), i = static_cast<int>(k % half);
    const double angle = sign * static_cast<double>(pos[t]) * RopeInvFreq(rope, i, head_dim);
    table[2 * k] = static_cast<float>(cos(angle));
    table[2 * k + 1] = static_cast<float>(sin(angle));
  }
}
__global__ void RopeApplyKernel(Elems x, const float* table, int n, int heads, int head_dim,
                                int stride, bool vec) {
  const int half = head_dim / 2, groups = (half + 7) / 8;  // groups of 8 pairs per (t, head)
  GRID_STRIDE(k, static_cast<size_t>(n) * heads * groups) {
    const size_t row = k / groups;  // t * heads + h
    const int i0 = static_cast<int>(k % groups) * 8, count = min(8, half - i0);
    const size_t t = row / heads, h = row - t * heads;
    const size_t at = t * stride + h * head_dim + i0;
    float a[8], b[8], cs[16];
    Load8(x, at, count, vec, a);
    Load8(x, at + half, count, vec, b);
    const float* tab = table + 2 * (t * half + i0);
    if (vec && count == 8) {
      for (int q = 0; q < 4; ++q) {
        const float4 c4 = reinterpret_cast<const float4*>(tab)[q];
        cs[4 * q] = c4.x, cs[4 * q + 1] = c4.y, cs[4 * q + 2] = c4.z, cs[4 * q + 3] = c4.w;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) cs[e] = e < 2 * count ? tab[e] : 0.0f;
    }
    // All 8 pairs (past count: zeros, not stored), so that the arrays stay in registers.
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float c = cs[2 * e], sn = cs[2 * e + 1], ae = a[e], be = b[e];
      a[e] = ae * c - be * sn;
      b[e] = be * c + ae * sn;
    }
    Store8(x, at, count, vec, a);
    Store8(x, at + half, count, vec, b);
  }
}

__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, size_t n, float lr,
                            float beta1, float beta2, float eps, float weight_decay, float inv_bc1,
                            float inv_bc2) {
  GRID_STRIDE(i, n) {
    AdamWUpdate(p, g, m, v, i, lr, beta1, beta2, eps, weight_decay, inv_bc1, inv_bc2);
  }
}
// Element i of the runs' concatenation: its run by binary search over the runs' first elements
// (a table of a few hundred entries, in L1), then the element of that run.
__global__ void AdamWRunsKernel(float* p, const float* g, float* m, float* v,
                                const AdamWRunEntry* runs, int count, size_t total, float lr,
                                float beta1, float beta2, float eps, float weight_decay,
                                float inv_bc1, float inv_bc2) {
  GRID_STRIDE(i, total) {
    int lo = 0, hi = count - 1;  // the last run whose first element is at or before i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (runs[mid].first <= i) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const AdamWRunEntry r = runs[lo];
    AdamWUpdate(p, g, m, v, r.offset + (i - r.first), lr, beta1, beta2, eps,
                r.decay ? weight_decay : 0.0f, inv_bc1, inv_bc2);
  }
}

}  // namespace

cudaError_t Fill(float* x, size_t n, float value, cudaStream_t s) {
  if (n) LaunchKernel(FillKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, x, n, value);
  return cudaGetLastError();
}
cudaError_t FillUniform(float* x, size_t n, uint32_t seed, float scale, cudaStream_t s) {
  if (n) LaunchKernel(FillUniformKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, x, n, seed, scale);
  return cudaGetLastError();
}
cudaError_t ToBf16(uint16_t* out, const float* x, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(ToBf16Kernel, dim3(Blocks(n)), dim3(kThreads), 0, s, out, x, n);
  return cudaGetLastError();
}
cudaError_t ToBf16Rows(uint16_t* out, size_t out_stride, const float* x, int rows, int cols,
                       cudaStream_t s) {
  const size_t n = static_cast<size_t>(rows) * cols;
  if (n) {
    LaunchKernel(ToBf16RowsKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, out, out_stride, x, cols,
                 n);
  }
  return cudaGetLastError();
}
cudaError_t Add(float* y, const float* a, const float* b, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(AddKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, y, a, b, n);
  return cudaGetLastError();
}
cudaError_t Axpy(float* y, float alpha, const float* x, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(AxpyKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, y, alpha, x, n);
  return cudaGetLastError();
}
cudaError_t ToFloat(float* out, Elems in, size_t n, cudaStream_t s) {
  if (n) {
    LaunchKernel(ToFloatKernel, dim3(GroupBlocks(n)), dim3(kThreads), 0, s, Elems{out, false}, in,
                 n, Aligned16(out, in.data));
  }
  return cudaGetLastError();
}
cudaError_t Scale(Elems x, float alpha, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(ScaleKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, x, alpha, n);
  return cudaGetLastError();
}
cudaError_t SumSquaresPartials(double* partial, const float* x, size_t n, cudaStream_t s) {
  const size_t blocks = SumSquaresBlocks(n);
  if (blocks > 0xffffffffu) return cudaErrorInvalidValue;
  if (blocks > 0) {
    LaunchKernel(SumSquaresKernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, s,
                 partial, x, n, static_cast<const SquaresBlock*>(nullptr));
  }
  return cudaGetLastError();
}
cudaError_t SumSquaresTable(double* partial, const float* x, const SquaresBlock* blocks, int count,
                            cudaStream_t s) {
  if (count > 0) {
    LaunchKernel(SumSquaresKernel, dim3(static_cast<unsigned>(count)), dim3(kThreads), 0, s,
                 partial, x, size_t{0}, blocks);
  }
  return cudaGetLastError();
}
cudaError_t EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n, int c,
                                  int start, int rows, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * c;
  if (total)
    LaunchKernel(EmbeddingForwardKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, out, ids, table,
                 n, c, start, rows);
  return cudaGetLastError();
}
cudaError_t EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c,
                         cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * c;
  if (total)
    LaunchKernel(EmbeddingAddKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, out, ids, table, n,
                 c);
  return cudaGetLastError();
}
cudaError_t AddBias(Elems out, Elems in, const float* bias, int n, int cols, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * cols;
  if (total)
    LaunchKernel(AddBiasKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, out, in, bias, n, cols);
  return cudaGetLastError();
}
cudaError_t CopyRowsToPools(void* k_pool, void* v_pool, const void* k, const void* v,
                            const int32_t* pool_rows, int n, size_t row_bytes, size_t src_stride,
                            cudaStream_t s) {
  if (row_bytes % sizeof(uint4) != 0 || src_stride % sizeof(uint4) != 0 || src_stride < row_bytes)
    return cudaErrorInvalidValue;
  const size_t words = n * row_bytes / sizeof(uint4);
  if (words) {
    LaunchKernel(CopyRowsToPoolsKernel, dim3(Blocks(words)), dim3(kThreads), 0, s,
                 static_cast<uint4*>(k_pool), static_cast<uint4*>(v_pool),
                 static_cast<const uint4*>(k), static_cast<const uint4*>(v), pool_rows, words,
                 static_cast<int>(row_bytes / sizeof(uint4)),
                 static_cast<int>(src_stride / sizeof(uint4)));
  }
  return cudaGetLastError();
}
size_t ColumnSumScratchBytes(int n, int cols, int sums) {
  const int slices = ColumnSlices(n, cols);
  return slices > 1 ? static_cast<size_t>(slices) * cols * sums * sizeof(double) : 0;
}
cudaError_t AddColumnPartials(float* dst, float* dst2, const double* partials, int slices, int cols,
                              cudaStream_t s) {
  if (cols > 0) {
    LaunchKernel(AddColumnPartialsKernel,
                 dim3((cols + kColTile - 1) / kColTile, dst2 != nullptr ? 2 : 1),
                 dim3(kColTile, ColumnRowGroups(slices)), 0, s, dst, dst2, partials, slices, cols);
  }
  return cudaGetLastError();
}
cudaError_t ColumnSumAdd(float* dst, Elems x, int n, int cols, double* scratch, cudaStream_t s) {
  if (n <= 0 || cols <= 0) return cudaGetLastError();
  const int slices = ColumnSlices(n, cols), rows = ColumnSliceRows(n, slices);
  LaunchKernel(ColumnSumAddKernel, dim3((cols + kColTile - 1) / kColTile, slices),
               dim3(kColTile, ColumnRowGroups(rows)), 0, s, dst, scratch, x, n, rows, cols);
  if (slices > 1) AddColumnPartials(dst, nullptr, scratch, slices, cols, s);
  return cudaGetLastError();
}
cudaError_t GeluForward(Elems out, Elems x, size_t n, cudaStream_t s) {
  if (n) {
    LaunchKernel(GeluForwardKernel, dim3(GroupBlocks(n)), dim3(kThreads), 0, s, out, x, n,
                 Aligned16(out.data, x.data));
  }
  return cudaGetLastError();
}
cudaError_t BiasGeluForward(Elems act, Elems pre, const float* acc, const float* bias, int n,
                            int cols, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * cols;
  if (total)
    LaunchKernel(BiasGeluForwardKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, act, pre, acc,
                 bias, n, cols);
  return cudaGetLastError();
}
cudaError_t GeluBackward(Elems dx, Elems dout, Elems x, size_t n, cudaStream_t s) {
  if (n) {
    LaunchKernel(GeluBackwardKernel, dim3(GroupBlocks(n)), dim3(kThreads), 0, s, dx, dout, x, n,
                 Aligned16(dx.data, dout.data, x.data));
  }
  return cudaGetLastError();
}
cudaError_t DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                       uint64_t key, int64_t row0, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * c;
  const uint64_t base = static_cast<uint64_t>(row0) * static_cast<uint64_t>(c);
  if (total) {
    LaunchKernel(DropoutAddKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, out, x, branch, total,
                 base, DropoutThreshold(p), 1.0f / (1.0f - p), key);
  }
  return cudaGetLastError();
}
cudaError_t SwiGluForward(Elems out, Elems gate, Elems up, int rows, int cols, int stride,
                          cudaStream_t s) {
  const size_t groups = static_cast<size_t>(rows) * ((cols + 7) / 8);
  if (groups) {
    // 16-byte accesses need every row's groups aligned: cols and stride multiples of 8.
    const bool vec = cols % 8 == 0 && stride % 8 == 0 && Aligned16(out.data, gate.data, up.data);
    LaunchKernel(SwiGluForwardKernel, dim3(Blocks(groups)), dim3(kThreads), 0, s, out, gate, up,
                 rows, cols, stride, vec);
  }
  return cudaGetLastError();
}
cudaError_t SwiGluBackward(Elems dgate, Elems dup, Elems dout, Elems gate, Elems up, int rows,
                           int cols, int stride, cudaStream_t s) {
  const size_t groups = static_cast<size_t>(rows) * ((cols + 7) / 8);
  if (groups) {
    const bool vec = cols % 8 == 0 && stride % 8 == 0 &&
                     Aligned16(dgate.data, dup.data, dout.data, gate.data, up.data);
    LaunchKernel(SwiGluBackwardKernel, dim3(Blocks(groups)), dim3(kThreads), 0, s, dgate, dup, dout,
                 gate, up, rows, cols, stride, vec);
  }
  return cudaGetLastError();
}
cudaError_t Rope(Elems x, const int32_t* pos, int n, int heads, int head_dim, int stride,
                 const RopeParams& rope, double sign, float* table, cudaStream_t s) {
  const int half = head_dim / 2;
  const size_t pairs = static_cast<size_t>(n) * half;
  if (pairs == 0 || heads <= 0) return cudaGetLastError();
  LaunchKernel(RopeTableKernel, dim3(Blocks(pairs)), dim3(kThreads), 0, s, table, pos, n, head_dim,
               rope, sign);
  const size_t groups = static_cast<size_t>(n) * heads * ((half + 7) / 8);
  LaunchKernel(RopeApplyKernel, dim3(Blocks(groups)), dim3(kThreads), 0, s, x, table, n, heads,
               head_dim, stride, Aligned16(x.data, table) && half % 8 == 0 && stride % 8 == 0);
  return cudaGetLastError();
}
cudaError_t AdamWRuns(float* p, const float* g, float* m, float* v, const AdamWRunEntry* runs,
                      int count, size_t total, float lr, float beta1, float beta2, float eps,
                      float weight_decay, float inv_bc1, float inv_bc2, cudaStream_t s) {
  if (total > 0 && count > 0) {
    LaunchKernel(AdamWRunsKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, p, g, m, v, runs,
                 count, total, lr, beta1, beta2, eps, weight_decay, inv_bc1, inv_bc2);
  }
  return cudaGetLastError();
}
cudaError_t AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float inv_bc1, float inv_bc2,
                  cudaStream_t s) {
  if (n) {
    LaunchKernel(AdamWKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, p, g, m, v, n, lr, beta1,
                 beta2, eps, weight_decay, inv_bc1, inv_bc2);
  }
  return cudaGetLastError();
}

}  // namespace eellm::cuda
