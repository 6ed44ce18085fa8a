// The shared-memory tiles and warp products of the fused attention kernels
// (flash_attention.cu, paged_decode.cu): bf16 tiles with padded rows, loading them from fp32 or
// bf16 rows (directly or through a paged KV cache's page table), the 16-row products X Y^T and
// P Y on tensor cores (warp_mma.cuh), and writing a warp's 16 accumulated rows.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "engine/cuda/async_copy.cuh"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/warp_mma.cuh"

namespace eellm::cuda {

// The default tile: 64 rows (keys, or queries in the backward), loaded by 4 warps.
constexpr int kTile = 64;  // keys per tile (and queries per tile in the backward)
constexpr int kWarps = 4;  // of the dQ kernel: 16 query rows each
constexpr int kThreads = kWarps * 32;
// bf16 row padding: rows stay 16-byte aligned for ldmatrix, and the 8 rows one 8x8 load reads
// fall in different banks.
constexpr int kSkew = 8;

__host__ __device__ constexpr size_t Align128(size_t x) { return (x + 127) / 128 * 128; }

// log2 of a paged cache's tokens a page (a power of two), what LoadTile's page_shift takes; -1
// otherwise.
inline int PageShift(int page_tokens) {
  if (page_tokens <= 0 || (page_tokens & (page_tokens - 1)) != 0) return -1;
  int shift = 0;
  while ((1 << shift) < page_tokens) ++shift;
  return shift;
}

// The bf16 tile (rows of D + kSkew) at byte offset `at` of shared memory; buffer `buf` of a
// double-buffered pair of Rows-row tiles.
template <int D, int Rows = kTile>
__device__ __forceinline__ __nv_bfloat16* SmemTile(unsigned char* smem, size_t at, int buf = 0) {
  return reinterpret_cast<__nv_bfloat16*>(smem + at) + buf * Rows * (D + kSkew);
}

// Copies rows [row0, row0 + Rows) of a strided fp32 or bf16 matrix (row r at src + r * stride,
// D values) into a bf16 tile [Rows][D + kSkew], with the block's Threads threads (fp32 rounded,
// bf16 copied); rows at or past `rows` become zeros (so NaN in unused cache rows never reaches a
// product). 16 bytes per load: a float4 (rounded to 4 bf16 through registers, at once) or 8 bf16
// (copied by cp.async: they land at the caller's CpAsyncWait for the group it commits); the rows
// and the tile's rows of D + kSkew bf16 are multiples of 16 bytes for D in {32, 64, 128}. Either
// way other threads see the tile after that wait and a __syncthreads. With `pages` (a paged KV
// cache, engine/kv_pages.h), row j is read from row pages[j >> page_shift] << page_shift |
// j % (1 << page_shift) of src.
template <int D, typename InT, int Rows = kTile, int Threads = kThreads>
__device__ void LoadTile(__nv_bfloat16* dst, const InT* src, size_t stride, int row0, int rows,
                         const int32_t* pages = nullptr, int page_shift = 0) {
  constexpr int kPer = 16 / sizeof(InT);  // values per load
  constexpr int kVec = D / kPer;
  for (int i = threadIdx.x; i < Rows * kVec; i += Threads) {
    const int r = i / kVec, c = (i % kVec) * kPer;
    const int row = row0 + r;
    size_t at = row;
    if (pages != nullptr && row < rows) {
      at = static_cast<size_t>(pages[row >> page_shift]) << page_shift |
           (row & ((1 << page_shift) - 1));
    }
    const InT* from = src + at * stride + c;
    __nv_bfloat16* d = dst + r * (D + kSkew) + c;
    if constexpr (std::is_same_v<InT, float>) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < rows) x = *reinterpret_cast<const float4*>(from);
      d[0] = __float2bfloat16(x.x);
      d[1] = __float2bfloat16(x.y);
      d[2] = __float2bfloat16(x.z);
      d[3] = __float2bfloat16(x.w);
    } else {
      const bool in = row < rows;
      CpAsync16(d, in ? from : src, in);  // zeros past `rows` (src: any valid address)
    }
  }
}

// acc[n] (the 16 x N product's 8-column blocks) += X_w Y^T: rows x0 .. x0 + 15 of tile x times
// rows y0 .. y0 + N - 1 of tile y, over the head dimension (both [.][D + kSkew]).
template <int D, int N>
__device__ void ProductXYt(float (&acc)[N / 8][4], const __nv_bfloat16* x, int x0,
                           const __nv_bfloat16* y, int y0, int lane) {
  constexpr int kLd = D + kSkew;
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    LdMatrixX4(a, FragRowsA(x, kLd, x0, kk * 16, lane));
    for (int n2 = 0; n2 < N / 16; ++n2) {
      uint32_t b[4];
      LdMatrixX4(b, FragRowsBt(y, kLd, y0 + n2 * 16, kk * 16, lane));
      MmaBf16(acc[2 * n2], a, b[0], b[1]);
      MmaBf16(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// acc[n] (16 x D, 8-column blocks) += P Y: P the 16 x 16 KB A operands p[kb], Y rows
// y0 .. y0 + 16 KB - 1 of tile y ([.][D + kSkew]).
template <int D, int KB>
__device__ void AccumulatePY(float (&acc)[D / 8][4], const uint32_t (&p)[KB][4],
                             const __nv_bfloat16* y, int y0, int lane) {
  constexpr int kLd = D + kSkew;
  for (int kb = 0; kb < KB; ++kb) {
    for (int n2 = 0; n2 < D / 16; ++n2) {
      uint32_t b[4];
      LdMatrixX4Trans(b, FragRowsA(y, kLd, y0 + kb * 16, n2 * 16, lane));
      MmaBf16(acc[2 * n2], p[kb], b[0], b[1]);
      MmaBf16(acc[2 * n2 + 1], p[kb], b[2], b[3]);
    }
  }
}

// Writes a warp's accumulators (16 rows x D, times `scale`) to global rows row0 .. row0 + 15
// below `rows` (row stride `stride`).
template <int D, typename T>
__device__ void StoreWarpRows(T* dst, size_t stride, int row0, int rows,
                              const float (&acc)[D / 8][4], float scale, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r >= rows) continue;
    T* p = dst + static_cast<size_t>(r) * stride + 2 * t4;
    for (int n = 0; n < D / 8; ++n) {
      StoreFloat(p + n * 8, acc[n][2 * half] * scale);
      StoreFloat(p + n * 8 + 1, acc[n][2 * half + 1] * scale);
    }
  }
}

}  // namespace eellm::cuda
