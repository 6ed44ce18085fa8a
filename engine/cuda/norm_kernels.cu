// CUDA kernels of LayerNorm and RMSNorm, forward and backward, row statistics accumulated in
// double (as the CPU backend does). The forward takes one row a block. The backward, for rows of
// 128 to 1,024 column groups for RMSNorm, 128 to 512 for LayerNorm (4 columns each where
// aligned: hidden sizes 512 to 4,096 and 2,048), is one pass: a block takes a run of rows, one at
// a time with the next row's loads in flight, writes dx and keeps each of its columns' gain (and
// bias) gradient terms in registers, summed over its rows in order; the blocks' sums are then
// added in a fixed tree (AddColumnPartials). Other rows take one row a block and a second pass
// over dout and x for the column sums (block_reduce.cuh: a block of kColTile columns x G row
// groups for each slice of rows, row group y summing the slice's rows y, y + G, ... in order).
// No atomics: results are deterministic (same bits every run).
#include <algorithm>
#include <cmath>

#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;

// Columns j .. j + U - 1 of a row, U = 4 (16-byte accesses: c % 4 == 0 and 16-byte aligned
// rows, Aligned16) or 1. The row kernels below take U columns a thread at a time; their double
// sums then add the same terms in another order (the same float results but in rare ties).
template <int U>
__device__ __forceinline__ void LoadCols(const float* p, float (&v)[U]) {
  if constexpr (U == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = *p;
  }
}
template <int U>
__device__ __forceinline__ void StoreCols(float* p, const float (&v)[U]) {
  if constexpr (U == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *p = v[0];
  }
}
template <int U>
__device__ __forceinline__ void StoreCols(__nv_bfloat16* p, const float (&v)[U]) {
  if constexpr (U == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(PackBf16x2(v[0], v[1]), PackBf16x2(v[2], v[3]));
  } else {
    *p = __float2bfloat16(v[0]);
  }
}
#define FOR_ROW_COLS(j, c) for (int j = U * threadIdx.x; j < (c); j += U * blockDim.x)

// The forward's output of columns j .. j + U - 1 from their x in v: ((v - mu) rs) g + b with a
// null b as 0 (kCentred, LayerNorm), else (v rs) g (RMSNorm).
template <bool kCentred, int U>
__device__ __forceinline__ void NormalizeCols(float (&v)[U], const float* g, const float* b, int j,
                                              float mu, float rs) {
  float w[U];
  LoadCols<U>(g + j, w);
  if constexpr (kCentred) {
    float bb[U] = {};
    if (b != nullptr) LoadCols<U>(b + j, bb);
    for (int u = 0; u < U; ++u) v[u] = ((v[u] - mu) * rs) * w[u] + bb[u];
  } else {
    for (int u = 0; u < U; ++u) v[u] = (v[u] * rs) * w[u];
  }
}

// The backward adds d/dx to res: rs (dy g - mean(dy g) - nrm mean(dy g nrm)), the first mean
// LayerNorm's alone (kCentred).
template <bool kCentred, int U>
__device__ __forceinline__ void AddNormInputGrad(float (&res)[U], const float (&dy)[U],
                                                 const float (&w)[U], const float (&nrm)[U],
                                                 float rs, float mean_dn, float mean_dn_n) {
  for (int u = 0; u < U; ++u) {
    if constexpr (kCentred) {
      res[u] += rs * (dy[u] * w[u] - mean_dn - nrm[u] * mean_dn_n);
    } else {
      res[u] += rs * (dy[u] * w[u] - nrm[u] * mean_dn_n);
    }
  }
}

// One row a block, U columns a thread. kCentred: LayerNorm (the row's mean subtracted, a bias
// added when b is non-null, mean written); else RMSNorm (mean and b unused). Row statistics in
// double. The forward outputs are GEMM operands: OutT float or __nv_bfloat16.
template <bool kCentred, int U, typename OutT>
__global__ void NormForwardKernel(OutT* out, float* mean, float* rstd, const float* x,
                                  const float* g, const float* b, int c, float eps) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  OutT* yr = out + r * c;
  double mu = 0.0;
  if constexpr (kCentred) {
    double s = 0.0;
    FOR_ROW_COLS(j, c) {
      float v[U];
      LoadCols<U>(xr + j, v);
      for (int u = 0; u < U; ++u) s += v[u];
    }
    mu = BlockSum(s, scratch) / c;
  }
  double ss = 0.0;
  FOR_ROW_COLS(j, c) {
    float v[U];
    LoadCols<U>(xr + j, v);
    for (int u = 0; u < U; ++u) ss += (v[u] - mu) * (v[u] - mu);  // (mu = 0: v[u]^2 exactly)
  }
  const float rs =
      static_cast<float>(1.0 / sqrt(BlockSum(ss, scratch) / c + static_cast<double>(eps)));
  const float muf = static_cast<float>(mu);
  FOR_ROW_COLS(j, c) {
    float v[U];
    LoadCols<U>(xr + j, v);
    NormalizeCols<kCentred, U>(v, g, b, j, muf, rs);
    StoreCols<U>(yr + j, v);
  }
  if (threadIdx.x == 0) {
    if constexpr (kCentred) mean[r] = muf;
    rstd[r] = rs;
  }
}

// NormForwardKernel for rows of at most blockDim.x U columns: each thread reads its U columns of
// x once, into registers, for the statistics and the output (the row is read once, not two or
// three times).
template <bool kCentred, int U, typename OutT>
__global__ void __launch_bounds__(1024)
    NormForwardRowKernel(OutT* out, float* mean, float* rstd, const float* x, const float* g,
                         const float* b, int c, float eps) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const int j = U * threadIdx.x;
  const bool mine = j < c;
  float v[U] = {};
  if (mine) LoadCols<U>(x + r * c + j, v);
  double mu = 0.0;
  if constexpr (kCentred) {
    double s = 0.0;
    for (int u = 0; u < U; ++u) s += v[u];
    mu = BlockSum(s, scratch) / c;
  }
  double ss = 0.0;
  if (mine) {
    for (int u = 0; u < U; ++u) ss += (v[u] - mu) * (v[u] - mu);  // (mu = 0: v[u]^2 exactly)
  }
  const float rs =
      static_cast<float>(1.0 / sqrt(BlockSum(ss, scratch) / c + static_cast<double>(eps)));
  const float muf = static_cast<float>(mu);
  if (mine) {
    NormalizeCols<kCentred, U>(v, g, b, j, muf, rs);
    StoreCols<U>(out + r * c + j, v);
  }
  if (threadIdx.x == 0) {
    if constexpr (kCentred) mean[r] = muf;
    rstd[r] = rs;
  }
}

// dx = dres + d/dx (dres may alias dx or be null: each element is read before it is written);
// kCentred as in NormForwardKernel (mean null for RMSNorm).
template <bool kCentred, int U>
__global__ void NormBackwardRowsKernel(float* dx, const float* dres, const float* dout,
                                       const float* x, const float* g, const float* mean,
                                       const float* rstd, int c) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  const float* dyr = dout + r * c;
  float* dxr = dx + r * c;
  const float* dresr = dres != nullptr ? dres + r * c : nullptr;
  const float rs = rstd[r];
  float mu = 0.0f;
  if constexpr (kCentred) mu = mean[r];
  double sum_dn = 0.0, sum_dn_n = 0.0;
  FOR_ROW_COLS(j, c) {
    float v[U], dy[U], w[U];
    LoadCols<U>(xr + j, v);
    LoadCols<U>(dyr + j, dy);
    LoadCols<U>(g + j, w);
    for (int u = 0; u < U; ++u) {
      const float dn = dy[u] * w[u];
      if constexpr (kCentred) sum_dn += dn;
      sum_dn_n += static_cast<double>(dn) * ((v[u] - mu) * rs);
    }
  }
  float mean_dn = 0.0f;
  if constexpr (kCentred) mean_dn = static_cast<float>(BlockSum(sum_dn, scratch) / c);
  const float mean_dn_n = static_cast<float>(BlockSum(sum_dn_n, scratch) / c);
  FOR_ROW_COLS(j, c) {
    float v[U], dy[U], w[U], nrm[U], res[U] = {};
    LoadCols<U>(xr + j, v);
    LoadCols<U>(dyr + j, dy);
    LoadCols<U>(g + j, w);
    if (dresr != nullptr) LoadCols<U>(dresr + j, res);
    for (int u = 0; u < U; ++u) nrm[u] = (v[u] - mu) * rs;
    AddNormInputGrad<kCentred, U>(res, dy, w, nrm, rs, mean_dn, mean_dn_n);
    StoreCols<U>(dxr + j, res);
  }
}

// The one-pass backward's most threads a block: LayerNorm's kernel keeps a second sum per column
// in registers, and within 64 registers a thread (1,024 threads) it would spill. (At 76 registers
// a block of more than 409 threads leaves room for one block an SM: LayerNorm rows of 1,640 to
// 2,048 columns run 16 warps an SM; 2 blocks of 512 would spill 44 bytes a thread.)
constexpr int OnePassThreads(bool centred) { return centred ? 512 : 1024; }
// The fewest column groups a row takes the one-pass backward with: a narrower row (a q/k norm's
// 128 columns are 32 groups of 4) would give its block one warp walking n / 256 rows with one
// row's loads in flight; the row kernel and the sliced column sums (block_reduce.cuh) keep many
// more in flight there.
constexpr int kOnePassMinGroups = 128;

// The one-pass backward: block b takes rows [b rows, (b + 1) rows) of n, thread t columns
// U t .. U t + U - 1 (blockDim.x U >= c), and writes dx as NormBackwardRowsKernel does, and its
// columns' sums over its rows of dout * norm (double, rows in order) to dg_part[b] and of dout
// to db_part[b] (null: not wanted), [gridDim.x, c] each.
template <bool kCentred, int U>
__global__ void __launch_bounds__(OnePassThreads(kCentred))
    NormBackwardKernel(float* dx, double* dg_part, double* db_part, const float* dres,
                       const float* dout, const float* x, const float* g, const float* mean,
                       const float* rstd, int n, int rows, int c) {
  __shared__ double scratch[2 * kBlockReduceScratch];
  const int begin = blockIdx.x * rows, end = min(n, begin + rows);
  const int j = U * threadIdx.x;
  const bool mine = j < c;
  float w[U] = {}, v[U] = {}, dy[U] = {}, res[U] = {};
  double acc_g[U] = {}, acc_b[U] = {};
  if (mine) LoadCols<U>(g + j, w);
  if (mine && begin < end) {
    const size_t at = static_cast<size_t>(begin) * c + j;
    LoadCols<U>(x + at, v);
    LoadCols<U>(dout + at, dy);
    if (dres != nullptr) LoadCols<U>(dres + at, res);
  }
  for (int r = begin; r < end; ++r) {
    const size_t at = static_cast<size_t>(r) * c + j;
    const float rs = rstd[r];
    float mu = 0.0f;
    if constexpr (kCentred) mu = mean[r];
    float nrm[U];
    double sum_dn = 0.0, sum_dn_n = 0.0;
    for (int u = 0; u < U; ++u) {
      nrm[u] = (v[u] - mu) * rs;
      const float dn = dy[u] * w[u];
      if constexpr (kCentred) sum_dn += dn;
      sum_dn_n += static_cast<double>(dn) * nrm[u];
      acc_g[u] += dy[u] * nrm[u];
      if constexpr (kCentred) acc_b[u] += dy[u];
    }
    // The next row's, loading while the block reduces (dres read before dx, which it may alias,
    // is written: the next row's dres is not this row's dx).
    float next_v[U] = {}, next_dy[U] = {}, next_res[U] = {};
    if (mine && r + 1 < end) {
      LoadCols<U>(x + at + c, next_v);
      LoadCols<U>(dout + at + c, next_dy);
      if (dres != nullptr) LoadCols<U>(dres + at + c, next_res);
    }
    if constexpr (kCentred) {
      BlockSum2(sum_dn, sum_dn_n, scratch);
    } else {
      sum_dn_n = BlockSum(sum_dn_n, scratch);
    }
    const float mean_dn = static_cast<float>(sum_dn / c);  // (0 for RMSNorm)
    const float mean_dn_n = static_cast<float>(sum_dn_n / c);
    if (mine) {
      AddNormInputGrad<kCentred, U>(res, dy, w, nrm, rs, mean_dn, mean_dn_n);
      StoreCols<U>(dx + at, res);
    }
    for (int u = 0; u < U; ++u) v[u] = next_v[u], dy[u] = next_dy[u], res[u] = next_res[u];
  }
  if (!mine) return;
  const size_t out = static_cast<size_t>(blockIdx.x) * c + j;
  for (int u = 0; u < U; ++u) {
    dg_part[out + u] = acc_g[u];
    if (db_part != nullptr) db_part[out + u] = acc_b[u];
  }
}

// dg[j] += sum_r dout * norm; db[j] += sum_r dout (db may be null). mean null: RMSNorm. Rows in
// the fixed order of block_reduce.cuh's column sums; sliced, the partials of dg, then of db.
__global__ void __launch_bounds__(kColMaxThreads, 2)
    NormParamGradKernel(float* dg, float* db, double* partials, const float* dout, const float* x,
                        const float* mean, const float* rstd, int n, int slice_rows, int c) {
  __shared__ double part[kMaxRowGroups][kColTile];
  const int j = blockIdx.x * kColTile + threadIdx.x;
  const int begin = blockIdx.y * slice_rows, end = min(n, begin + slice_rows);
  double acc_g = 0.0, acc_b = 0.0;
  if (j < c) {
    for (int r = begin + threadIdx.y; r < end; r += blockDim.y) {
      const size_t i = static_cast<size_t>(r) * c + j;
      const float nrm = mean != nullptr ? (x[i] - mean[r]) * rstd[r] : x[i] * rstd[r];
      acc_g += dout[i] * nrm;
      acc_b += dout[i];
    }
  }
  const double total_g = ColumnGroupSum(acc_g, part);
  const double total_b = ColumnGroupSum(acc_b, part);
  if (threadIdx.y == 0 && j < c) {
    StoreColumnSum(dg, partials, total_g, j, c);
    if (db != nullptr) {  // (db's partials follow dg's; no partials without slices)
      StoreColumnSum(db, gridDim.y > 1 ? partials + static_cast<size_t>(gridDim.y) * c : nullptr,
                     total_b, j, c);
    }
  }
}

// The gain (and bias) gradients' column sums, sliced over rows where they are few columns.
void LaunchNormParamGrad(float* dg, float* db, double* scratch, const float* dout, const float* x,
                         const float* mean, const float* rstd, int n, int c, cudaStream_t s) {
  const int slices = ColumnSlices(n, c), rows = ColumnSliceRows(n, slices);
  LaunchKernel(NormParamGradKernel, dim3((c + kColTile - 1) / kColTile, slices),
               dim3(kColTile, ColumnRowGroups(rows)), 0, s, dg, db, scratch, dout, x, mean, rstd, n,
               rows, c);
  if (slices == 1) return;
  AddColumnPartials(dg, db, scratch, slices, c, s);
}

}  // namespace

// Whether the row kernels may take 4 columns a thread (LoadCols<4>): c % 4 == 0, aligned rows.
template <typename... Ptrs>
bool FourColumns(int c, const Ptrs*... p) {
  return c % 4 == 0 && Aligned16(p...);
}
// The row kernels' threads for rows of c columns, 4 or 1 a thread.
unsigned Threads(int c, bool four) { return RowThreads(four ? c / 4 : c, kThreads); }

namespace {

// A forward: a row a block, read once where a thread takes a row's U columns (up to 1,024 groups
// of U), else the row kernel's loops.
template <bool kCentred, typename OutT>
cudaError_t LaunchNormForward(bool four, OutT* out, float* mean, float* rstd, const float* x,
                              const float* g, const float* b, int n, int c, float eps,
                              cudaStream_t s) {
  const int groups = four ? c / 4 : c;
  if (groups <= 1024) {
    auto* kernel =
        four ? NormForwardRowKernel<kCentred, 4, OutT> : NormForwardRowKernel<kCentred, 1, OutT>;
    return LaunchKernel(kernel, dim3(n), dim3(RowThreads(groups, 1024)), 0, s, out, mean, rstd, x,
                        g, b, c, eps);
  }
  auto* kernel = four ? NormForwardKernel<kCentred, 4, OutT> : NormForwardKernel<kCentred, 1, OutT>;
  return LaunchKernel(kernel, dim3(n), dim3(Threads(c, four)), 0, s, out, mean, rstd, x, g, b, c,
                      eps);
}

// Blocks of the one-pass backward: up to kBackwardBlocks runs of rows (about 2 blocks an SM on an
// H100/H200; the run length depends on n alone, so the sums' order does too).
constexpr int kBackwardBlocks = 256;
// Whether rows of c columns take the one-pass backward (4 columns a thread where `four`).
bool OnePass(bool centred, int c, bool four) {
  const int groups = four ? c / 4 : c;
  return groups >= kOnePassMinGroups && groups <= OnePassThreads(centred);
}
int BackwardRows(int n) { return (n + kBackwardBlocks - 1) / kBackwardBlocks; }

// Both backwards: one pass and the partials' sum, or the row kernel and the column sums.
template <bool kCentred>
cudaError_t NormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                         const float* x, const float* g, const float* mean, const float* rstd,
                         int n, int c, double* scratch, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  const bool four = FourColumns(c, dx, dres, dout, x, g);
  if (!OnePass(kCentred, c, four)) {
    auto* kernel = four ? NormBackwardRowsKernel<kCentred, 4> : NormBackwardRowsKernel<kCentred, 1>;
    LaunchKernel(kernel, dim3(n), dim3(Threads(c, four)), 0, s, dx, dres, dout, x, g, mean, rstd,
                 c);
    LaunchNormParamGrad(dg, db, scratch, dout, x, mean, rstd, n, c, s);
    return cudaGetLastError();
  }
  const int rows = BackwardRows(n), blocks = (n + rows - 1) / rows;
  double* db_part = db != nullptr ? scratch + static_cast<size_t>(blocks) * c : nullptr;
  auto* kernel = four ? NormBackwardKernel<kCentred, 4> : NormBackwardKernel<kCentred, 1>;
  LaunchKernel(kernel, dim3(blocks), dim3(RowThreads(four ? c / 4 : c, OnePassThreads(kCentred))),
               0, s, dx, scratch, db_part, dres, dout, x, g, mean, rstd, n, rows, c);
  AddColumnPartials(dg, db, scratch, blocks, c, s);  // (db's partials: db_part)
  return cudaGetLastError();
}

}  // namespace

size_t NormBackwardScratchBytes(int n, int c, int sums) {
  if (n <= 0 || c <= 0) return 0;
  // Either path may run (the pointers' alignment decides between 4 columns a thread and 1).
  const size_t sliced = ColumnSumScratchBytes(n, c, sums);
  // (LayerNorm's one pass: a subset of RMSNorm's; 1 column a thread: c groups.)
  if (!OnePass(/*centred=*/false, c, c % 4 == 0) && !OnePass(false, c, false)) return sliced;
  const int rows = BackwardRows(n), blocks = (n + rows - 1) / rows;
  return std::max(static_cast<size_t>(blocks) * c * sums * sizeof(double), sliced);
}

cudaError_t LayerNormForward(Elems out, float* mean, float* rstd, const float* x, const float* g,
                             const float* b, int n, int c, float eps, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  return WithElementType(out, [&](auto* o) {
    using OutT = ElementOf<decltype(o)>;
    const bool four = FourColumns(c, o, x, g, b);
    return LaunchNormForward<true, OutT>(four, o, mean, rstd, x, g, b, n, c, eps, s);
  });
}

cudaError_t LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                              const float* x, const float* g, const float* mean, const float* rstd,
                              int n, int c, double* scratch, cudaStream_t s) {
  return NormBackward<true>(dx, dres, dg, db, dout, x, g, mean, rstd, n, c, scratch, s);
}

cudaError_t RmsNormForward(Elems out, float* rstd, const float* x, const float* g, int n, int c,
                           float eps, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  return WithElementType(out, [&](auto* o) {
    using OutT = ElementOf<decltype(o)>;
    const bool four = FourColumns(c, o, x, g);
    return LaunchNormForward<false, OutT>(four, o, nullptr, rstd, x, g, nullptr, n, c, eps, s);
  });
}

cudaError_t RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                            const float* x, const float* g, const float* rstd, int n, int c,
                            double* scratch, cudaStream_t s) {
  return NormBackward<false>(dx, dres, dg, nullptr, dout, x, g, nullptr, rstd, n, c, scratch, s);
}

}  // namespace eellm::cuda
