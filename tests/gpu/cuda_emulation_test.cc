// The CPU emulation of CUDA (tests/gpu/emu) reports what would fault or fail on a GPU: host
// memory where the CUDA backend needs device memory (kernel arguments, cuBLAS operands, the
// device side of a copy), launches over the shared-memory limit, misaligned WMMA tiles. The
// backend's results under it are checked by the parity suite
// (EELLM_PARITY_BACKEND=emulated-cuda[-bf16]).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <memory>
#include <vector>

#include "engine/cuda/kernel_launch.h"
#include "gtest/gtest.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"

namespace eellm {
namespace {

class CudaEmulation : public ::testing::Test {
 protected:
  void SetUp() override {
    auto be = MakeEmulatedCudaBackend(0, false);
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = std::move(*be);
    dev_ = static_cast<float*>(be_->Alloc(64 * sizeof(float)));
    dev2_ = static_cast<float*>(be_->Alloc(64 * sizeof(float)));
  }
  void TearDown() override {
    if (be_) {
      be_->Free(dev_);
      be_->Free(dev2_);
    }
  }
  std::unique_ptr<Backend> be_;
  float *dev_ = nullptr, *dev2_ = nullptr;
  std::vector<float> host_ = std::vector<float>(64, 1.0f);
};

TEST_F(CudaEmulation, DeviceMemoryWorks) {
  be_->CopyFromHost(dev_, host_.data(), 64 * sizeof(float));
  be_->Scale(dev_, 3.0f, 64);
  be_->Copy(dev2_, dev_, 64 * sizeof(float));
  std::vector<float> back(64);
  be_->CopyToHost(back.data(), dev2_, 64 * sizeof(float));
  EXPECT_EQ(back, std::vector<float>(64, 3.0f));
}

TEST_F(CudaEmulation, HostPointerAsKernelArgumentFails) {
  EXPECT_DEATH(be_->Scale(host_.data(), 2.0f, 64), "kernel argument points to host memory");
}

TEST_F(CudaEmulation, HostPointerAsGemmOperandFails) {
  EXPECT_DEATH(be_->Linear(dev_, host_.data(), dev2_, nullptr, 8, 8, 8, false),
               "cuBLAS operand is not device memory");
}

TEST_F(CudaEmulation, CopiesCheckWhichSideIsTheDevice) {
  std::vector<float> other(64);
  EXPECT_DEATH(be_->CopyToHost(other.data(), host_.data(), 64 * sizeof(float)), "wrong kinds");
  EXPECT_DEATH(be_->CopyFromHost(host_.data(), other.data(), 64 * sizeof(float)), "wrong kinds");
  EXPECT_DEATH(be_->Copy(dev_, host_.data(), 64 * sizeof(float)), "wrong kinds");
  // A copy running past the end of an allocation is not device memory either.
  EXPECT_DEATH(be_->Copy(dev_, dev2_, 65 * sizeof(float)), "wrong kinds");
}

__global__ void TouchSharedKernel(float* out) {
  EE_DYNAMIC_SHARED(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<float*>(smem)[31 - threadIdx.x];
}

// As on the device: more than 48 KiB of dynamic shared memory only after the kernel's opt-in,
// and never more than 227 KiB.
TEST(CudaEmulationLimits, LargeDynamicSharedMemoryNeedsTheOptIn) {
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), 32 * sizeof(float)), cudaSuccess);
  EXPECT_EQ(LaunchKernel(TouchSharedKernel, dim3(1), dim3(32), 48 * 1024, nullptr, out),
            cudaSuccess);
  EXPECT_NE(LaunchKernel(TouchSharedKernel, dim3(1), dim3(32), 64 * 1024, nullptr, out),
            cudaSuccess);
  EXPECT_NE(cudaGetLastError(), cudaSuccess);  // the failed launch is reported
  EXPECT_NE(cudaFuncSetAttribute(TouchSharedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 228 * 1024),
            cudaSuccess);
  ASSERT_EQ(cudaFuncSetAttribute(TouchSharedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 64 * 1024),
            cudaSuccess);
  EXPECT_EQ(LaunchKernel(TouchSharedKernel, dim3(1), dim3(32), 64 * 1024, nullptr, out),
            cudaSuccess);
  EXPECT_NE(LaunchKernel(TouchSharedKernel, dim3(1), dim3(32), 65 * 1024, nullptr, out),
            cudaSuccess);
  (void)cudaGetLastError();
  EXPECT_EQ(cudaFree(out), cudaSuccess);
}

__global__ void LoadTileKernel(const __nv_bfloat16* tile, unsigned ld) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>
      a;
  nvcuda::wmma::load_matrix_sync(a, tile, ld);
}

// WMMA tiles need 32-byte aligned pointers and leading dimensions of a multiple of 16 bytes.
TEST(CudaEmulationLimits, MisalignedWmmaTilesAbort) {
  __nv_bfloat16* tile = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&tile), 64 * 64 * sizeof(__nv_bfloat16)),
            cudaSuccess);
  EXPECT_EQ(LaunchKernel(LoadTileKernel, dim3(1), dim3(32), 0, nullptr, tile + 16, 24u),
            cudaSuccess);
  EXPECT_DEATH(LaunchKernel(LoadTileKernel, dim3(1), dim3(32), 0, nullptr, tile + 8, 24u),
               "needs 32-byte alignment");
  EXPECT_DEATH(LaunchKernel(LoadTileKernel, dim3(1), dim3(32), 0, nullptr, tile, 20u),
               "multiple of 16 bytes");
  EXPECT_EQ(cudaFree(tile), cudaSuccess);
}

// The GEMM precision benchmark of `eellm bench train` runs all four variants of a shape with odd
// sizes and finds the reduced-precision products within bf16 rounding of the fp32 one.
TEST(CudaEmulationGemms, EveryPrecisionComputesTheSameProduct) {
  auto t = MeasureEmulatedCudaGemms({{"odd", 33, 20, 48}, {"wide", 8, 96, 16}}, 2);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->size(), 2u);
  for (const GemmTiming& g : *t) {
    EXPECT_GT(g.fp32, 0);
    EXPECT_GT(g.fast_bf16, 0);
    EXPECT_GT(g.bf16_in, 0);
    EXPECT_GT(g.bf16_all, 0);
    EXPECT_GT(g.max_rel_diff, 0) << "bf16 rounding changed nothing: were the operands rounded?";
    EXPECT_LT(g.max_rel_diff, 2e-2);
  }
  EXPECT_FALSE(MeasureEmulatedCudaGemms({{"empty", 0, 4, 4}}, 1).ok());
}

}  // namespace
}  // namespace eellm
