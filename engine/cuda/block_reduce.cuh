// Block-wide reductions for the CUDA kernels: every thread passes its value and gets the
// block's result. `scratch` holds blockDim.x values in shared memory; blockDim.x must be a power
// of two. The tree order is fixed, so results are deterministic.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace eellm::cuda
