// CUDA kernels of LayerNorm and RMSNorm, forward and backward: one block per row, row
// statistics accumulated in double (as the CPU backend does). Gain and bias gradients are column
// sums over rows (block_reduce.cuh): a block of kColTile columns x G row groups for each slice
// of rows, where row group y sums the slice's rows y, y + G, ... in order (double), the groups'
// partials are added in a fixed pairwise tree and the slices' in order; no atomics, so results
// are deterministic (same bits every run).
#include <cmath>

#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;

// The forward outputs are GEMM operands: OutT float or __nv_bfloat16.
template <typename OutT>
__global__ void LayerNormForwardKernel(OutT* out, float* mean, float* rstd, const float* x,
                                       const float* g, const float* b, int c, float eps) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  OutT* yr = out + r * c;
  double s = 0.0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
  const double mu = BlockSum(s, scratch) / c;
  double ss = 0.0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const double d = xr[j] - mu;
    ss += d * d;
  }
  const double rs = 1.0 / sqrt(BlockSum(ss, scratch) / c + static_cast<double>(eps));
  const float muf = static_cast<float>(mu), rsf = static_cast<float>(rs);
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float nrm = (xr[j] - muf) * rsf;
    StoreFloat(yr + j, nrm * g[j] + (b != nullptr ? b[j] : 0.0f));
  }
  if (threadIdx.x == 0) {
    mean[r] = muf;
    rstd[r] = rsf;
  }
}

// dx = dres + d/dx (dres may alias dx or be null).
__global__ void LayerNormBackwardRowsKernel(float* dx, const float* dres, const float* dout,
                                            const float* x, const float* g, const float* mean,
                                            const float* rstd, int c) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  const float* dyr = dout + r * c;
  float* dxr = dx + r * c;
  const float* dresr = dres != nullptr ? dres + r * c : nullptr;
  const float mu = mean[r], rs = rstd[r];
  double sum_dn = 0.0, sum_dn_n = 0.0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float nrm = (xr[j] - mu) * rs;
    const float dn = dyr[j] * g[j];
    sum_dn += dn;
    sum_dn_n += static_cast<double>(dn) * nrm;
  }
  const float mean_dn = static_cast<float>(BlockSum(sum_dn, scratch) / c);
  const float mean_dn_n = static_cast<float>(BlockSum(sum_dn_n, scratch) / c);
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float nrm = (xr[j] - mu) * rs;
    const float dn = dyr[j] * g[j];
    dxr[j] = (dresr != nullptr ? dresr[j] : 0.0f) + rs * (dn - mean_dn - nrm * mean_dn_n);
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

// Four consecutive floats at p (16-byte aligned), and stores of four values as OutT.
__device__ __forceinline__ float4 Load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ void Store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void Store4(__nv_bfloat16* p, float a, float b, float c, float d) {
  auto bits = [](float v) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16(v)));
  };
  *reinterpret_cast<uint2*>(p) = make_uint2(bits(a) | bits(b) << 16, bits(c) | bits(d) << 16);
}

// RMSNorm rows. With `vec` (c % 4 == 0, every row pointer 16-byte aligned) each thread takes 4
// consecutive columns at a time (16-byte loads); the sums then add the same terms in another
// order (double: the same float results but in rare ties).
template <typename OutT>
__global__ void RmsNormForwardKernel(OutT* out, float* rstd, const float* x, const float* g, int c,
                                     float eps, bool vec) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  OutT* yr = out + r * c;
  double ss = 0.0;
  if (vec) {
    for (int j = 4 * threadIdx.x; j < c; j += 4 * blockDim.x) {
      const float4 v = Load4(xr + j);
      ss += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y +
            static_cast<double>(v.z) * v.z + static_cast<double>(v.w) * v.w;
    }
  } else {
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  }
  const float rs =
      static_cast<float>(1.0 / sqrt(BlockSum(ss, scratch) / c + static_cast<double>(eps)));
  if (vec) {
    for (int j = 4 * threadIdx.x; j < c; j += 4 * blockDim.x) {
      const float4 v = Load4(xr + j), w = Load4(g + j);
      Store4(yr + j, (v.x * rs) * w.x, (v.y * rs) * w.y, (v.z * rs) * w.z, (v.w * rs) * w.w);
    }
  } else {
    for (int j = threadIdx.x; j < c; j += blockDim.x) StoreFloat(yr + j, (xr[j] * rs) * g[j]);
  }
  if (threadIdx.x == 0) rstd[r] = rs;
}

__global__ void RmsNormBackwardRowsKernel(float* dx, const float* dres, const float* dout,
                                          const float* x, const float* g, const float* rstd, int c,
                                          bool vec) {
  __shared__ double scratch[kBlockReduceScratch];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  const float* dyr = dout + r * c;
  float* dxr = dx + r * c;
  const float* dresr = dres != nullptr ? dres + r * c : nullptr;
  const float rs = rstd[r];
  double sum_dn_n = 0.0;
  if (vec) {
    for (int j = 4 * threadIdx.x; j < c; j += 4 * blockDim.x) {
      const float4 dy = Load4(dyr + j), w = Load4(g + j), v = Load4(xr + j);
      sum_dn_n += static_cast<double>(dy.x * w.x) * (v.x * rs) +
                  static_cast<double>(dy.y * w.y) * (v.y * rs) +
                  static_cast<double>(dy.z * w.z) * (v.z * rs) +
                  static_cast<double>(dy.w * w.w) * (v.w * rs);
    }
  } else {
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
      sum_dn_n += static_cast<double>(dyr[j] * g[j]) * (xr[j] * rs);
    }
  }
  const float mean_dn_n = static_cast<float>(BlockSum(sum_dn_n, scratch) / c);
  if (vec) {
    for (int j = 4 * threadIdx.x; j < c; j += 4 * blockDim.x) {
      const float4 dy = Load4(dyr + j), w = Load4(g + j), v = Load4(xr + j);
      const float4 res = dresr != nullptr ? Load4(dresr + j) : make_float4(0.f, 0.f, 0.f, 0.f);
      Store4(dxr + j, res.x + rs * (dy.x * w.x - (v.x * rs) * mean_dn_n),
             res.y + rs * (dy.y * w.y - (v.y * rs) * mean_dn_n),
             res.z + rs * (dy.z * w.z - (v.z * rs) * mean_dn_n),
             res.w + rs * (dy.w * w.w - (v.w * rs) * mean_dn_n));
    }
    return;
  }
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float nrm = xr[j] * rs;
    dxr[j] = (dresr != nullptr ? dresr[j] : 0.0f) + rs * (dyr[j] * g[j] - nrm * mean_dn_n);
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
  AddColumnPartials(dg, scratch, slices, c, s);
  if (db != nullptr) AddColumnPartials(db, scratch + static_cast<size_t>(slices) * c, slices, c, s);
}

}  // namespace

cudaError_t LayerNormForward(Elems out, float* mean, float* rstd, const float* x, const float* g,
                             const float* b, int n, int c, float eps, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  return WithElementType(out, [&](auto* o) {
    return LaunchKernel(LayerNormForwardKernel<ElementOf<decltype(o)>>, dim3(n), dim3(kThreads), 0,
                        s, o, mean, rstd, x, g, b, c, eps);
  });
}

cudaError_t LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                              const float* x, const float* g, const float* mean, const float* rstd,
                              int n, int c, double* scratch, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  LaunchKernel(LayerNormBackwardRowsKernel, dim3(n), dim3(kThreads), 0, s, dx, dres, dout, x, g,
               mean, rstd, c);
  LaunchNormParamGrad(dg, db, scratch, dout, x, mean, rstd, n, c, s);
  return cudaGetLastError();
}

cudaError_t RmsNormForward(Elems out, float* rstd, const float* x, const float* g, int n, int c,
                           float eps, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  return WithElementType(out, [&](auto* o) {
    const bool vec = c % 4 == 0 && Aligned16(o, x, g);
    return LaunchKernel(RmsNormForwardKernel<ElementOf<decltype(o)>>, dim3(n), dim3(kThreads), 0, s,
                        o, rstd, x, g, c, eps, vec);
  });
}

cudaError_t RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                            const float* x, const float* g, const float* rstd, int n, int c,
                            double* scratch, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  const bool vec = c % 4 == 0 && Aligned16(dx, dres, dout, x, g);
  LaunchKernel(RmsNormBackwardRowsKernel, dim3(n), dim3(kThreads), 0, s, dx, dres, dout, x, g, rstd,
               c, vec);
  LaunchNormParamGrad(dg, nullptr, scratch, dout, x, nullptr, rstd, n, c, s);
  return cudaGetLastError();
}

}  // namespace eellm::cuda
