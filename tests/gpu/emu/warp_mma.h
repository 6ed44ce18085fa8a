// The CPU emulation of engine/cuda/warp_mma.cuh (included from there under
// EELLM_CUDA_EMULATION): ldmatrix and the m16n8k16 bf16 MMA, with the register layouts that
// header states. They are warp-collective: each lane publishes its operands (WarpExchange, one
// barrier) and computes its own part of the result from the whole warp's. Like the device, the
// loads require 16-byte aligned row addresses inside the block's dynamic shared memory (else
// they abort); the MMA multiplies the bf16 values exactly and adds the 16 products to the
// accumulator in k order, in fp32.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda_bf16.h"
#include "cuda_emulation.h"

namespace eellm::cuda {
namespace emulated_mma {

inline float Lo(uint32_t r) { return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r)}); }
inline float Hi(uint32_t r) {
  return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r >> 16)});
}
inline uint32_t Bits(__nv_bfloat16 x) { return x.bits; }

// The 32 row addresses of an x4 load, checked.
inline void ExchangeRows(const __nv_bfloat16* row, const __nv_bfloat16* (&rows)[32]) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || !eellm_emu::InDynamicShared(row, 16)) {
    std::fprintf(stderr,
                 "CUDA emulation: ldmatrix row address %p is not 16-byte aligned dynamic shared "
                 "memory\n",
                 static_cast<const void*>(row));
    std::abort();
  }
  eellm_emu::WarpExchange(row, rows);
}

inline int Lane() { return eellm_emu::LinearThread() % 32; }

// ldmatrix .x4, plain or transposed (`trans`): r[j] = (row g, cols 2t, 2t + 1) of tile j, or
// (rows 2t, 2t + 1, col g).
inline void LdMatrix(uint32_t (&r)[4], const __nv_bfloat16* row, bool trans) {
  const __nv_bfloat16* rows[32];
  ExchangeRows(row, rows);
  const int g = Lane() / 4, t = Lane() % 4;
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat16* const* tile = rows + j * 8;  // its 8 row addresses
    r[j] = trans ? Bits(tile[2 * t][g]) | (Bits(tile[2 * t + 1][g]) << 16)
                 : Bits(tile[g][2 * t]) | (Bits(tile[g][2 * t + 1]) << 16);
  }
}
}  // namespace emulated_mma

inline void LdMatrixX4(uint32_t (&r)[4], const __nv_bfloat16* row) {
  emulated_mma::LdMatrix(r, row, false);
}

inline void LdMatrixX4Trans(uint32_t (&r)[4], const __nv_bfloat16* row) {
  emulated_mma::LdMatrix(r, row, true);
}

inline void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace emulated_mma;  // NOLINT
  struct Operands {
    uint32_t a[4];
    uint32_t b[2];
  };
  Operands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  Operands all[32];
  eellm_emu::WarpExchange(mine, all);
  const int g = Lane() / 4, t = Lane() % 4;
  // This lane's rows of A (g and g + 8) come from lanes 4g .. 4g + 3, its columns of B (2t and
  // 2t + 1) from lanes 4n .. 4n + 3 for n = 2t, 2t + 1.
  float arow[2][16], bcol[2][16];
  for (int tp = 0; tp < 4; ++tp) {
    const Operands& x = all[4 * g + tp];
    for (int half = 0; half < 2; ++half) {
      arow[half][2 * tp] = Lo(x.a[half]);
      arow[half][2 * tp + 1] = Hi(x.a[half]);
      arow[half][2 * tp + 8] = Lo(x.a[half + 2]);
      arow[half][2 * tp + 9] = Hi(x.a[half + 2]);
    }
    for (int e = 0; e < 2; ++e) {
      const Operands& y = all[4 * (2 * t + e) + tp];
      bcol[e][2 * tp] = Lo(y.b[0]);
      bcol[e][2 * tp + 1] = Hi(y.b[0]);
      bcol[e][2 * tp + 8] = Lo(y.b[1]);
      bcol[e][2 * tp + 9] = Hi(y.b[1]);
    }
  }
  for (int half = 0; half < 2; ++half)
    for (int e = 0; e < 2; ++e) {
      float acc = d[2 * half + e];
      for (int k = 0; k < 16; ++k) acc += arow[half][k] * bcol[e][k];
      d[2 * half + e] = acc;
    }
}

}  // namespace eellm::cuda
