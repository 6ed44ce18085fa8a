// CUDA kernels of LayerNorm and RMSNorm, forward and backward: one block per row, row
// statistics accumulated in double (as the CPU backend does); gain and bias gradients are
// column sums over rows in order (one thread per column), so results are deterministic.
#include <cmath>

#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void LayerNormForwardKernel(float* out, float* mean, float* rstd, const float* x,
                                       const float* g, const float* b, int c, float eps) {
  __shared__ double scratch[kThreads];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  float* yr = out + r * c;
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
    yr[j] = nrm * g[j] + (b != nullptr ? b[j] : 0.0f);
  }
  if (threadIdx.x == 0) {
    mean[r] = muf;
    rstd[r] = rsf;
  }
}

__global__ void LayerNormBackwardRowsKernel(float* dx, const float* dout, const float* x,
                                            const float* g, const float* mean, const float* rstd,
                                            int c) {
  __shared__ double scratch[kThreads];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  const float* dyr = dout + r * c;
  float* dxr = dx + r * c;
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
    dxr[j] += rs * (dn - mean_dn - nrm * mean_dn_n);
  }
}

// dg[j] += sum_r dout * norm; db[j] += sum_r dout (db may be null). mean null: RMSNorm.
__global__ void NormParamGradKernel(float* dg, float* db, const float* dout, const float* x,
                                    const float* mean, const float* rstd, int n, int c) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= c) return;
  double acc_g = 0.0, acc_b = 0.0;
  for (int r = 0; r < n; ++r) {
    const size_t i = static_cast<size_t>(r) * c + j;
    const float nrm = mean != nullptr ? (x[i] - mean[r]) * rstd[r] : x[i] * rstd[r];
    acc_g += dout[i] * nrm;
    acc_b += dout[i];
  }
  dg[j] += static_cast<float>(acc_g);
  if (db != nullptr) db[j] += static_cast<float>(acc_b);
}

__global__ void RmsNormForwardKernel(float* out, float* rstd, const float* x, const float* g, int c,
                                     float eps) {
  __shared__ double scratch[kThreads];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  float* yr = out + r * c;
  double ss = 0.0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  const float rs =
      static_cast<float>(1.0 / sqrt(BlockSum(ss, scratch) / c + static_cast<double>(eps)));
  for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] = (xr[j] * rs) * g[j];
  if (threadIdx.x == 0) rstd[r] = rs;
}

__global__ void RmsNormBackwardRowsKernel(float* dx, const float* dout, const float* x,
                                          const float* g, const float* rstd, int c) {
  __shared__ double scratch[kThreads];
  const size_t r = blockIdx.x;
  const float* xr = x + r * c;
  const float* dyr = dout + r * c;
  float* dxr = dx + r * c;
  const float rs = rstd[r];
  double sum_dn_n = 0.0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    sum_dn_n += static_cast<double>(dyr[j] * g[j]) * (xr[j] * rs);
  }
  const float mean_dn_n = static_cast<float>(BlockSum(sum_dn_n, scratch) / c);
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float nrm = xr[j] * rs;
    dxr[j] += rs * (dyr[j] * g[j] - nrm * mean_dn_n);
  }
}

unsigned ColumnBlocks(int c) { return static_cast<unsigned>((c + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t LayerNormForward(float* out, float* mean, float* rstd, const float* x, const float* g,
                             const float* b, int n, int c, float eps, cudaStream_t s) {
  if (n > 0 && c > 0)
    LaunchKernel(LayerNormForwardKernel, dim3(n), dim3(kThreads), 0, s, out, mean, rstd, x, g, b, c,
                 eps);
  return cudaGetLastError();
}

cudaError_t LayerNormBackward(float* dx, float* dg, float* db, const float* dout, const float* x,
                              const float* g, const float* mean, const float* rstd, int n, int c,
                              cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  LaunchKernel(LayerNormBackwardRowsKernel, dim3(n), dim3(kThreads), 0, s, dx, dout, x, g, mean,
               rstd, c);
  LaunchKernel(NormParamGradKernel, dim3(ColumnBlocks(c)), dim3(kThreads), 0, s, dg, db, dout, x,
               mean, rstd, n, c);
  return cudaGetLastError();
}

cudaError_t RmsNormForward(float* out, float* rstd, const float* x, const float* g, int n, int c,
                           float eps, cudaStream_t s) {
  if (n > 0 && c > 0)
    LaunchKernel(RmsNormForwardKernel, dim3(n), dim3(kThreads), 0, s, out, rstd, x, g, c, eps);
  return cudaGetLastError();
}

cudaError_t RmsNormBackward(float* dx, float* dg, const float* dout, const float* x, const float* g,
                            const float* rstd, int n, int c, cudaStream_t s) {
  if (n <= 0 || c <= 0) return cudaGetLastError();
  LaunchKernel(RmsNormBackwardRowsKernel, dim3(n), dim3(kThreads), 0, s, dx, dout, x, g, rstd, c);
  LaunchKernel(NormParamGradKernel, dim3(ColumnBlocks(c)), dim3(kThreads), 0, s, dg, nullptr, dout,
               x, nullptr, rstd, n, c);
  return cudaGetLastError();
}

}  // namespace eellm::cuda
