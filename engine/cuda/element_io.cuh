// Loads and stores of one element as fp32 or bf16 (operands, engine/tensor/operand.h):
// computation stays fp32, a bf16 store rounds to nearest even. The plain C++ launchers of
// cuda_kernels.h take such tensors as Elems. Two ways to use them in a kernel:
// - tile kernels (norms, attention) are templated on the element type: WithElementType calls a
//   launch with the typed pointer;
// - elementwise kernels take the Elems themselves and branch per access (LoadAt, StoreAt): the
//   branch is the same for the whole grid, and these kernels are bound by memory, not issue.
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

__device__ __forceinline__ float LoadAt(Elems e, size_t i) {
  return e.bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(e.data)[i])
                : static_cast<const float*>(e.data)[i];
}
__device__ __forceinline__ void StoreAt(Elems e, size_t i, float v) {
  if (e.bf16) {
    static_cast<__nv_bfloat16*>(e.data)[i] = __float2bfloat16(v);
  } else {
    static_cast<float*>(e.data)[i] = v;
  }
}

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
