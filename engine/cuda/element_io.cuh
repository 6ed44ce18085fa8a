// Loads and stores of one element as fp32 or bf16, for kernels templated on the dtype of an
// operand (engine/tensor/operand.h): computation stays fp32, a bf16 store rounds to nearest even.
// The plain C++ launchers of cuda_kernels.h take such tensors as Elems; WithElementType calls a
// launch with the typed pointer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "engine/cuda/cuda_kernels.h"

namespace eellm::cuda {

__device__ __forceinline__ float LoadAsFloat(const float* p) { return *p; }
__device__ __forceinline__ float LoadAsFloat(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
__device__ __forceinline__ void StoreFloat(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreFloat(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// fn(e.data as a float* or an __nv_bfloat16*); ElementOf<decltype(ptr)> names the element type
// inside fn (e.g. to instantiate a kernel template).
template <typename Fn>
cudaError_t WithElementType(Elems e, Fn&& fn) {
  if (e.bf16) return fn(static_cast<__nv_bfloat16*>(e.data));
  return fn(static_cast<float*>(e.data));
}
template <typename Ptr>
using ElementOf = std::remove_pointer_t<Ptr>;

}  // namespace eellm::cuda
