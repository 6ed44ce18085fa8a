// How the *.cu files launch kernels and declare dynamic shared memory, written so that the same
// kernel source also runs under the CPU emulation of tests/gpu/emu (EELLM_CUDA_EMULATION),
// which checks kernel logic where no GPU exists:
//   LaunchKernel(kernel, grid, block, shared_bytes, stream, args...)  ==  kernel<<<...>>>(args...)
//   EE_DYNAMIC_SHARED(name);  ==  extern __shared__ unsigned char name[] (128-byte aligned)
#pragma once

#include <cuda_runtime.h>

#ifndef EELLM_CUDA_EMULATION

template <typename... Params, typename... Args>
inline cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                                size_t shared_bytes, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  // Peek, not Get: a launcher that enqueues several kernels returns cudaGetLastError() once at
  // its end, which must still see the error of any of them.
  return cudaPeekAtLastError();
}
#define EE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

#endif
