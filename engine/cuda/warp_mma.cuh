// Warp-level tensor-core primitives (sm_80 and later) for the attention kernels: the
// m16n8k16 bf16 MMA with fp32 accumulation and ldmatrix loads of 8x8 bf16 tiles from shared
// memory. Unlike WMMA, their register layouts are specified (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"), so a kernel can run the softmax on the accumulators in registers. With
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major) a[0]: row g, cols 2t, 2t+1   a[1]: row g+8, cols 2t, 2t+1
//                        a[2]: row g, cols 2t+8, 2t+9  a[3]: row g+8, cols 2t+8, 2t+9
//   B (16x8, k x n)      b0: rows 2t, 2t+1, col g      b1: rows 2t+8, 2t+9, col g
//   C, D (16x8, fp32)    c[0], c[1]: row g, cols 2t, 2t+1; c[2], c[3]: row g+8, same cols
// Each 32-bit register holds two bf16, the lower column (or row, for B) in the low half.
// LdMatrixX4 loads four 8x8 tiles: lane l gives the address of row l % 8 of tile l / 8 (16-byte
// aligned, in shared memory) and receives in r[j] row g, cols 2t, 2t+1 of tile j; with Trans it
// receives rows 2t, 2t+1 of col g (the tile transposed). The CPU emulation of tests/gpu/emu
// (EELLM_CUDA_EMULATION) provides the same functions, exchanging registers between its lanes.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/element_io.cuh"

#ifdef EELLM_CUDA_EMULATION
#include "tests/gpu/emu/warp_mma.h"
#else

namespace eellm::cuda {

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const __nv_bfloat16* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const __nv_bfloat16* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a b (m16n8k16, bf16 inputs, fp32 accumulation).
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace eellm::cuda

#endif  // EELLM_CUDA_EMULATION

namespace eellm::cuda {

// 2^x in one instruction (ex2.approx.ftz: 2 ulp; 2^-inf = 0), for the softmax, whose scores
// are pre-multiplied by log2(e).
__device__ __forceinline__ float FastExp2(float x) {
#ifdef EELLM_CUDA_EMULATION
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
constexpr float kLog2e = 1.4426950408889634f;

// Row addresses (this lane's, for LdMatrixX4) in a bf16 tile of row length ld:
// - FragRowsA: the 16x16 block at (r0, c0) as an A operand; loaded transposed, the same
//   addresses give B operands for the two 8-column blocks at c0 and c0 + 8 of a 16-row block
//   of the k index (y in P y);
// - FragRowsBt: the 16 rows r0 .. r0 + 15 (columns c0 .. c0 + 15) as the B operands of two
//   8-column blocks of X Y^T (y's rows are the columns of the product).
__device__ __forceinline__ const __nv_bfloat16* FragRowsA(const __nv_bfloat16* tile, int ld, int r0,
                                                          int c0, int lane) {
  return tile + (r0 + lane % 8 + ((lane / 8) % 2) * 8) * ld + c0 + (lane / 16) * 8;
}
__device__ __forceinline__ const __nv_bfloat16* FragRowsBt(const __nv_bfloat16* tile, int ld,
                                                           int r0, int c0, int lane) {
  return tile + (r0 + lane % 8 + (lane / 16) * 8) * ld + c0 + ((lane / 8) % 2) * 8;
}

// The A operand of an m16n8k16 product from two 16x8 fp32 accumulators side by side (columns
// 0-7 in c0, 8-15 in c1): the register reuse that keeps P (or dS) out of shared memory.
__device__ __forceinline__ void AccumulatorsAsA(uint32_t (&a)[4], const float (&c0)[4],
                                                const float (&c1)[4]) {
  a[0] = PackBf16x2(c0[0], c0[1]);
  a[1] = PackBf16x2(c0[2], c0[3]);
  a[2] = PackBf16x2(c1[0], c1[1]);
  a[3] = PackBf16x2(c1[2], c1[3]);
}

}  // namespace eellm::cuda
