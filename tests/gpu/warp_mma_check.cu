// See warp_mma_check.h.
#include <cuda_bf16.h>

#include <cstring>

#include "engine/cuda/kernel_launch.h"
#include "engine/cuda/warp_mma.cuh"
#include "tests/gpu/warp_mma_check.h"

namespace eellm::testing {
namespace {

using cuda::AccumulatorsAsA;
using cuda::FragRowsA;
using cuda::FragRowsBt;
using cuda::LdMatrixX4;
using cuda::LdMatrixX4Trans;
using cuda::MmaBf16;

constexpr int kLd = 24;  // bf16 per shared row: 16 + 8 of padding (16-byte aligned rows)

// Stores a 16x16 product held as two 16x8 accumulators (the C layout of warp_mma.cuh).
__device__ void StoreC(float* out, const float (&c)[2][4], int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int n = 0; n < 2; ++n) {
    for (int half = 0; half < 2; ++half) {
      out[(g + 8 * half) * 16 + n * 8 + 2 * t] = c[n][2 * half];
      out[(g + 8 * half) * 16 + n * 8 + 2 * t + 1] = c[n][2 * half + 1];
    }
  }
}

__global__ void WarpMmaCheckKernel(float* out, const uint16_t* x, const uint16_t* y,
                                   const uint16_t* z) {
  EE_DYNAMIC_SHARED(smem);
  auto* tiles = reinterpret_cast<__nv_bfloat16*>(smem);  // x, y, z: [16][kLd] each
  const int lane = threadIdx.x;
  for (int i = lane; i < 3 * 256; i += 32) {
    const uint16_t* src = i < 256 ? x : i < 512 ? y : z;
    const int m = i / 256, r = (i % 256) / 16, c = i % 16;
    uint16_t bits = src[r * 16 + c];
    __nv_bfloat16 v;
    static_assert(sizeof(v) == sizeof(bits), "bf16 is 16 bits");
    std::memcpy(&v, &bits, sizeof(bits));
    tiles[m * 16 * kLd + r * kLd + c] = v;
  }
  __syncwarp();
  const __nv_bfloat16 *xs = tiles, *ys = tiles + 16 * kLd, *zs = tiles + 32 * kLd;
  uint32_t a[4], b[4];
  LdMatrixX4(a, FragRowsA(xs, kLd, 0, 0, lane));
  float xyt[2][4] = {}, xz[2][4] = {}, pz[2][4] = {};
  LdMatrixX4(b, FragRowsBt(ys, kLd, 0, 0, lane));
  MmaBf16(xyt[0], a, b[0], b[1]);
  MmaBf16(xyt[1], a, b[2], b[3]);
  StoreC(out, xyt, lane);
  LdMatrixX4Trans(b, FragRowsA(zs, kLd, 0, 0, lane));
  MmaBf16(xz[0], a, b[0], b[1]);
  MmaBf16(xz[1], a, b[2], b[3]);
  StoreC(out + 256, xz, lane);
  uint32_t p[4];
  AccumulatorsAsA(p, xyt[0], xyt[1]);
  MmaBf16(pz[0], p, b[0], b[1]);
  MmaBf16(pz[1], p, b[2], b[3]);
  StoreC(out + 512, pz, lane);
  for (auto& block : xyt)
    for (float& e : block) e += 1.0f;
  LdMatrixX4(b, FragRowsBt(ys, kLd, 0, 0, lane));
  MmaBf16(xyt[0], a, b[0], b[1]);
  MmaBf16(xyt[1], a, b[2], b[3]);
  StoreC(out + 768, xyt, lane);
}

}  // namespace

cudaError_t RunWarpMmaCheck(float* out, const uint16_t* x, const uint16_t* y, const uint16_t* z) {
  const size_t shared = sizeof(__nv_bfloat16) * 3 * 16 * kLd;
  const cudaError_t e =
      LaunchKernel(WarpMmaCheckKernel, dim3(1), dim3(32), shared, nullptr, out, x, y, z);
  if (e != cudaSuccess) return e;
  return cudaDeviceSynchronize();
}

}  // namespace eellm::testing
