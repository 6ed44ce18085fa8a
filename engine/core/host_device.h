// EE_HOST_DEVICE: marks the functions of engine/core that the CPU backend and the CUDA kernels
// (and their CPU emulation) share: __host__ __device__ under nvcc, nothing elsewhere.
#pragma once

#if defined(__CUDACC__)
#define EE_HOST_DEVICE __host__ __device__
#else
#define EE_HOST_DEVICE
#endif
