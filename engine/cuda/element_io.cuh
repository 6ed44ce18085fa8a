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

#include <cstdint>
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

// Two floats rounded to bf16 (nearest even) in one register, `lo` in the low half: one
// cvt.rn.bf16x2.f32 on the device.
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
#ifdef EELLM_CUDA_EMULATION
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16(hi))) << 16);
#else
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
#endif
}
// The values of a PackBf16x2 register as floats (exact: a bf16 is a float's upper half).
__device__ __forceinline__ float Bf16x2Lo(uint32_t packed) { return __uint_as_float(packed << 16); }
__device__ __forceinline__ float Bf16x2Hi(uint32_t packed) {
  return __uint_as_float(packed & 0xffff0000u);
}

// Eight consecutive elements from i0 (a multiple of 8), `count` of them (<= 8) valid: with
// `vec` (every tensor of the launch 16-byte aligned, Aligned16) and all 8 valid, one 16-byte
// load or store for bf16, two for fp32; otherwise one access per element. Elementwise kernels
// take 8 elements per thread so: 2-byte accesses one thread each reach a fraction of the
// memory bandwidth.
__device__ __forceinline__ void Load8(Elems e, size_t i0, int count, bool vec, float (&v)[8]) {
  if (vec && count == 8) {
    if (e.bf16) {
      const uint4 raw =
          *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(e.data) + i0);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      for (int k = 0; k < 4; ++k) {
        v[2 * k] = Bf16x2Lo(w[k]);
        v[2 * k + 1] = Bf16x2Hi(w[k]);
      }
    } else {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(e.data) + i0);
      const float4 a = p[0], b = p[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z,
      v[7] = b.w;
    }
    return;
  }
  for (int k = 0; k < 8; ++k) v[k] = k < count ? LoadAt(e, i0 + k) : 0.0f;
}
__device__ __forceinline__ void Store8(Elems e, size_t i0, int count, bool vec,
                                       const float (&v)[8]) {
  if (vec && count == 8) {
    if (e.bf16) {
      uint32_t w[4];
      for (int k = 0; k < 4; ++k) w[k] = PackBf16x2(v[2 * k], v[2 * k + 1]);
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(e.data) + i0) =
          make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(e.data) + i0);
      p[0] = make_float4(v[0], v[1], v[2], v[3]);
      p[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    return;
  }
  for (int k = 0; k < count; ++k) StoreAt(e, i0 + k, v[k]);
}
// Whether every pointer is 16-byte aligned (Load8 / Store8's `vec`); null ones count as aligned.
template <typename... Ptrs>
bool Aligned16(const Ptrs*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
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
