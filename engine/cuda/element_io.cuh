// Loads and stores of one element as fp32 or bf16, for kernels templated on the dtype of a GEMM
// operand (engine/tensor/operand.h): computation stays fp32, a bf16 store rounds to nearest even.
// The plain C++ launchers of cuda_kernels.h pass bf16 tensors as uint16_t bits; Bf16Ptr turns
// them into __nv_bfloat16 pointers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace eellm::cuda {

__device__ __forceinline__ float LoadAsFloat(const float* p) { return *p; }
__device__ __forceinline__ float LoadAsFloat(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
__device__ __forceinline__ void StoreFloat(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreFloat(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

inline __nv_bfloat16* Bf16Ptr(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* Bf16Ptr(const uint16_t* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}

}  // namespace eellm::cuda
