// CUDA kernels of the elementwise, reduction, embedding, bias, activation, RoPE and AdamW ops.
// Reductions are deterministic: fixed blocks summed in a fixed order (no atomics), matching the
// CPU backend's order where it matters (embedding and bias gradients accumulate rows in order).
#include <cmath>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kReduceBlock = size_t{1} << 14;  // elements per SumSquares partial

unsigned Blocks(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (size_t{1} << 20) ? (b > 0 ? b : 1) : (size_t{1} << 20));
}

#define GRID_STRIDE(i, n)                                                 \
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < (n); \
       i += size_t{gridDim.x} * blockDim.x)

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
__global__ void ToBf16Kernel(uint16_t* out, const float* x, size_t n) {
  GRID_STRIDE(i, n) {
    const uint32_t u = __float_as_uint(x[i]);
    out[i] = (u & 0x7fffffffu) > 0x7f800000u
                 ? static_cast<uint16_t>((u >> 16) | 0x40)
                 : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
__global__ void AddKernel(float* y, const float* a, const float* b, size_t n) {
  GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}
__global__ void AxpyKernel(float* y, float alpha, const float* x, size_t n) {
  GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
__global__ void ScaleKernel(float* x, float alpha, size_t n) { GRID_STRIDE(i, n) x[i] *= alpha; }

// One CUDA block per kReduceBlock elements: partial[blockIdx.x] = sum of squares (double).
__global__ void SumSquaresKernel(double* partial, const float* x, size_t n) {
  __shared__ double acc[kThreads];
  const size_t begin = blockIdx.x * kReduceBlock;
  const size_t end = begin + kReduceBlock < n ? begin + kReduceBlock : n;
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

// One thread per column walks the tokens in order (deterministic accumulation).
__global__ void EmbeddingBackwardKernel(float* dtable, const int32_t* ids, const float* dout, int n,
                                        int c, int start, int rows) {
  GRID_STRIDE(j, static_cast<size_t>(c)) {
    for (int t = 0; t < n; ++t) {
      const int64_t row = static_cast<int64_t>(ids[t]) - start;
      if (row < 0 || row >= rows) continue;
      dtable[static_cast<size_t>(row) * c + j] += dout[static_cast<size_t>(t) * c + j];
    }
  }
}

__global__ void AddBiasKernel(float* out, const float* bias, int n, int cols) {
  GRID_STRIDE(i, static_cast<size_t>(n) * cols) out[i] += bias[i % cols];
}

// dst[j] += sum over rows of x[r, j], rows in order, accumulated in double.
__global__ void ColumnSumAddKernel(float* dst, const float* x, int n, int cols) {
  GRID_STRIDE(j, static_cast<size_t>(cols)) {
    double acc = 0.0;
    for (int r = 0; r < n; ++r) acc += x[static_cast<size_t>(r) * cols + j];
    dst[j] += static_cast<float>(acc);
  }
}

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

__global__ void GeluForwardKernel(float* out, const float* x, size_t n) {
  GRID_STRIDE(i, n) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    out[i] = 0.5f * xi * (1.0f + tanhf(u));
  }
}
__global__ void GeluBackwardKernel(float* dx, const float* dout, const float* x, size_t n) {
  GRID_STRIDE(i, n) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    const float th = tanhf(u);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * xi * xi);
    const float grad = 0.5f * (1.0f + th) + 0.5f * xi * (1.0f - th * th) * du;
    dx[i] = grad * dout[i];
  }
}
__device__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__global__ void SwiGluForwardKernel(float* out, const float* gate, const float* up, size_t n) {
  GRID_STRIDE(i, n) {
    const float gi = gate[i];
    out[i] = gi * Sigmoid(gi) * up[i];
  }
}
__global__ void SwiGluBackwardKernel(float* dgate, float* dup, const float* dout, const float* gate,
                                     const float* up, size_t n) {
  GRID_STRIDE(i, n) {
    const float gi = gate[i], ui = up[i], dy = dout[i];
    const float s = Sigmoid(gi);
    const float dsilu = s * (1.0f + gi * (1.0f - s));
    dgate[i] = dy * ui * dsilu;
    dup[i] = dy * gi * s;
  }
}

// One thread per (token, pair index i < head_dim / 2), all heads.
__global__ void RopeKernel(float* x, const int32_t* pos, int n, int heads, int head_dim,
                           float theta, double sign) {
  const int half = head_dim / 2;
  GRID_STRIDE(k, static_cast<size_t>(n) * half) {
    const int t = static_cast<int>(k / half), i = static_cast<int>(k % half);
    const double inv_freq = pow(static_cast<double>(theta), -2.0 * i / head_dim);
    const double angle = sign * static_cast<double>(pos[t]) * inv_freq;
    const float c = static_cast<float>(cos(angle));
    const float s = static_cast<float>(sin(angle));
    float* xt = x + static_cast<size_t>(t) * heads * head_dim;
    for (int h = 0; h < heads; ++h) {
      float* xh = xt + static_cast<size_t>(h) * head_dim;
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * c - b * s;
      xh[i + half] = b * c + a * s;
    }
  }
}

__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, size_t n, float lr,
                            float beta1, float beta2, float eps, float weight_decay, float inv_bc1,
                            float inv_bc2) {
  GRID_STRIDE(i, n) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi * inv_bc1;
    const float v_hat = vi * inv_bc2;
    p[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p[i]);
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
cudaError_t Add(float* y, const float* a, const float* b, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(AddKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, y, a, b, n);
  return cudaGetLastError();
}
cudaError_t Axpy(float* y, float alpha, const float* x, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(AxpyKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, y, alpha, x, n);
  return cudaGetLastError();
}
cudaError_t Scale(float* x, float alpha, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(ScaleKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, x, alpha, n);
  return cudaGetLastError();
}
size_t SumSquaresMaxBlocks(size_t n) { return (n + kReduceBlock - 1) / kReduceBlock; }
cudaError_t SumSquaresPartials(double* partial, int* blocks, const float* x, size_t n,
                               cudaStream_t s) {
  *blocks = static_cast<int>(SumSquaresMaxBlocks(n));
  if (*blocks > 0)
    LaunchKernel(SumSquaresKernel, dim3(*blocks), dim3(kThreads), 0, s, partial, x, n);
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
cudaError_t EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n,
                                   int c, int start, int rows, cudaStream_t s) {
  if (n > 0 && c > 0) {
    LaunchKernel(EmbeddingBackwardKernel, dim3(Blocks(c)), dim3(kThreads), 0, s, dtable, ids, dout,
                 n, c, start, rows);
  }
  return cudaGetLastError();
}
cudaError_t AddBias(float* out, const float* bias, int n, int cols, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * cols;
  if (total)
    LaunchKernel(AddBiasKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, out, bias, n, cols);
  return cudaGetLastError();
}
cudaError_t ColumnSumAdd(float* dst, const float* x, int n, int cols, cudaStream_t s) {
  if (n > 0 && cols > 0)
    LaunchKernel(ColumnSumAddKernel, dim3(Blocks(cols)), dim3(kThreads), 0, s, dst, x, n, cols);
  return cudaGetLastError();
}
cudaError_t GeluForward(float* out, const float* x, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(GeluForwardKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, out, x, n);
  return cudaGetLastError();
}
cudaError_t GeluBackward(float* dx, const float* dout, const float* x, size_t n, cudaStream_t s) {
  if (n) LaunchKernel(GeluBackwardKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, dx, dout, x, n);
  return cudaGetLastError();
}
cudaError_t SwiGluForward(float* out, const float* gate, const float* up, size_t n,
                          cudaStream_t s) {
  if (n) LaunchKernel(SwiGluForwardKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, out, gate, up, n);
  return cudaGetLastError();
}
cudaError_t SwiGluBackward(float* dgate, float* dup, const float* dout, const float* gate,
                           const float* up, size_t n, cudaStream_t s) {
  if (n)
    LaunchKernel(SwiGluBackwardKernel, dim3(Blocks(n)), dim3(kThreads), 0, s, dgate, dup, dout,
                 gate, up, n);
  return cudaGetLastError();
}
cudaError_t Rope(float* x, const int32_t* pos, int n, int heads, int head_dim, float theta,
                 double sign, cudaStream_t s) {
  const size_t total = static_cast<size_t>(n) * (head_dim / 2);
  if (total)
    LaunchKernel(RopeKernel, dim3(Blocks(total)), dim3(kThreads), 0, s, x, pos, n, heads, head_dim,
                 theta, sign);
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
