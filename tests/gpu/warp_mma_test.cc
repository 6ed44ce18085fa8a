// The register layouts of engine/cuda/warp_mma.cuh (ldmatrix, the m16n8k16 MMA, accumulators
// reused as an A operand) against plain matrix products, through warp_mma_check.h's kernel. Built
// into cuda_emulation_tests (the CPU emulation; label unit) and into warp_mma_gpu_tests (the GPU;
// label gpu, skipped without one unless EELLM_REQUIRE_GPU=1). The inputs are small integers, so
// every product is exact in fp32 whatever the order of its sums: any difference is a layout
// error, and the failure message names the product and the first element that differs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/gpu/require_gpu.h"
#include "tests/gpu/warp_mma_check.h"

namespace eellm {
namespace {

uint16_t Bf16Bits(float v) {  // exact for the small integers used here
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return static_cast<uint16_t>(u >> 16);
}

using Matrix = std::vector<float>;  // 16x16 row-major

Matrix Product(const Matrix& a, const Matrix& b, bool transpose_b) {
  Matrix c(256, 0.0f);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      for (int k = 0; k < 16; ++k)
        c[i * 16 + j] += a[i * 16 + k] * (transpose_b ? b[j * 16 + k] : b[k * 16 + j]);
  return c;
}

// "" when equal, else the first element that differs.
std::string FirstDifference(const float* got, const Matrix& want) {
  for (int i = 0; i < 256; ++i) {
    if (got[i] != want[i]) {
      return "row " + std::to_string(i / 16) + " col " + std::to_string(i % 16) + ": got " +
             std::to_string(got[i]) + ", want " + std::to_string(want[i]);
    }
  }
  return "";
}

TEST(WarpMma, LayoutsMatchMatrixProducts) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (testing::GpuRequired()) FAIL() << "no CUDA GPU, but EELLM_REQUIRE_GPU is set";
    GTEST_SKIP() << "no CUDA GPU on this machine: warp MMA layout test skipped";
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-3, 3);
  Matrix x(256), y(256), z(256);
  for (Matrix* m : {&x, &y, &z})
    for (float& v : *m) v = static_cast<float>(small(rng));
  x[0] = 3.0f;  // never all zeros
  std::vector<uint16_t> bits(3 * 256);
  for (int i = 0; i < 256; ++i) {
    bits[i] = Bf16Bits(x[i]);
    bits[256 + i] = Bf16Bits(y[i]);
    bits[512 + i] = Bf16Bits(z[i]);
  }
  uint16_t* in = nullptr;
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&in), bits.size() * sizeof(uint16_t)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), 4 * 256 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(in, bits.data(), bits.size() * sizeof(uint16_t), cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_EQ(cudaMemset(out, 0xFF, 4 * 256 * sizeof(float)), cudaSuccess);  // NaN: unwritten shows
  ASSERT_EQ(testing::RunWarpMmaCheck(out, in, in + 256, in + 512), cudaSuccess);
  std::vector<float> got(4 * 256);
  ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost),
            cudaSuccess);
  cudaFree(in);
  cudaFree(out);

  const Matrix xyt = Product(x, y, true), xz = Product(x, z, false);
  const Matrix pz = Product(xyt, z, false);  // |X Y^T| <= 144: exact in bf16
  Matrix twice(256);
  for (int i = 0; i < 256; ++i) twice[i] = 2 * xyt[i] + 1;
  EXPECT_EQ(FirstDifference(&got[0], xyt), "") << "X Y^T (ldmatrix, FragRowsA / FragRowsBt)";
  EXPECT_EQ(FirstDifference(&got[256], xz), "") << "X Z (ldmatrix.trans)";
  EXPECT_EQ(FirstDifference(&got[512], pz), "") << "bf16(X Y^T) Z (AccumulatorsAsA)";
  EXPECT_EQ(FirstDifference(&got[768], twice), "") << "accumulation into C";
}

}  // namespace
}  // namespace eellm
