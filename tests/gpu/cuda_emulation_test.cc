// The CPU emulation of CUDA (tests/gpu/emu) reports what would fault or fail on a GPU: host
// memory where the CUDA backend needs device memory (kernel arguments, cuBLAS operands, the
// device side of a copy), launches over the shared-memory limit, misaligned cp.async, ldmatrix
// and vector accesses, and (by running a block's threads in either order) missing barriers.
// The backend's results under it are checked by the parity suite
// (EELLM_PARITY_BACKEND=emulated-cuda[-bf16]).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <memory>
#include <vector>

#include "engine/cuda/async_copy.cuh"
#include "engine/cuda/kernel_launch.h"
#include "engine/cuda/warp_mma.cuh"
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

// A launch and a wait for it: the kernel runs then (the device runs behind the host, so a fault in
// a kernel shows up at the next operation that waits for it).
template <typename... Params, typename... Args>
void LaunchAndWait(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                   cudaStream_t stream, Args... args) {
  LaunchKernel(kernel, grid, block, shared, stream, args...);
  cudaDeviceSynchronize();
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

// Warp 0 shuffles (twice) where warp 1 skips ahead to __syncthreads; then every thread reads what
// the other warp wrote.
__global__ void WarpSkipsKernel(int* out) {
  EE_DYNAMIC_SHARED(smem);
  int* seen = reinterpret_cast<int*>(smem);
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 32) v = __shfl_xor_sync(0xffffffffu, v, 1) + __shfl_xor_sync(0xffffffffu, v, 2);
  seen[threadIdx.x] = v;
  __syncthreads();
  out[threadIdx.x] = seen[(threadIdx.x + 32) % 64];
}

// Lane 0 shuffles while the other lanes of its warp wait at __syncthreads.
__global__ void LanesDivergeKernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Each thread of a block of 64 notes when it first ran (a counter per block, read and written
// without a barrier: the emulation runs a thread to its barrier before the next starts).
__global__ void RunOrderKernel(int* order, int* counter) {
  order[blockIdx.x * 64 + counter[blockIdx.x]++] = static_cast<int>(threadIdx.x);
  __syncthreads();
}

// The threads of a block run in index order or in reverse, alternating from block to block (and
// launch to launch), so that a missing barrier shows up whichever of two threads writes.
TEST(CudaEmulationBarriers, BlocksRunTheirThreadsInBothOrders) {
  int *order = nullptr, *counter = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&order), 4 * 64 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&counter), 4 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMemset(counter, 0, 4 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(LaunchKernel(RunOrderKernel, dim3(4), dim3(64), 0, nullptr, order, counter),
            cudaSuccess);
  std::vector<int> got(4 * 64);
  ASSERT_EQ(cudaMemcpy(got.data(), order, got.size() * sizeof(int), cudaMemcpyDeviceToHost),
            cudaSuccess);
  int forward = 0, reverse = 0;
  for (int b = 0; b < 4; ++b) {
    bool up = true, down = true;
    for (int i = 0; i < 64; ++i) {
      up = up && got[b * 64 + i] == i;
      down = down && got[b * 64 + i] == 63 - i;
    }
    EXPECT_TRUE(up || down) << "block " << b;
    forward += up;
    reverse += down;
    if (b > 0) EXPECT_NE(got[b * 64], got[(b - 1) * 64]) << "blocks " << b - 1 << ", " << b;
  }
  EXPECT_EQ(forward, 2);
  EXPECT_EQ(reverse, 2);
  EXPECT_EQ(cudaFree(order), cudaSuccess);
  EXPECT_EQ(cudaFree(counter), cudaSuccess);
}

// Lane 31 exits (in a block of 64); the others shuffle with a full mask (undefined on the
// device, as it is in a block of 48, whose second warp has 16 lanes).
__global__ void LaneExitsBeforeShuffleKernel(int* out) {
  if (threadIdx.x == 31 && blockDim.x == 64) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  __syncthreads();
}

// Warps pass warp-level barriers on their own, as on the device: a warp may skip work (and the
// barriers in it) that another does between two __syncthreads. Lanes of one warp at different
// barriers abort, and so does a shuffle in a warp that lacks lanes (exited, or a partial warp).
TEST(CudaEmulationBarriers, WarpsMaySkipWarpLevelBarriersLanesMayNot) {
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), 64 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(LaunchKernel(WarpSkipsKernel, dim3(1), dim3(64), 64 * sizeof(int), nullptr, out),
            cudaSuccess);
  std::vector<int> got(64);
  ASSERT_EQ(cudaMemcpy(got.data(), out, 64 * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int t = 0; t < 64; ++t) {
    const int other = (t + 32) % 64;  // warp 0's values are (t ^ 1) + (t ^ 2)
    EXPECT_EQ(got[t], other < 32 ? (other ^ 1) + (other ^ 2) : other) << "thread " << t;
  }
  EXPECT_DEATH(LaunchAndWait(LanesDivergeKernel, dim3(1), dim3(32), 0, nullptr, out),
               "lanes of a warp reached different barriers");
  EXPECT_DEATH(LaunchAndWait(LaneExitsBeforeShuffleKernel, dim3(1), dim3(64), 0, nullptr, out),
               "some of its lanes have exited");
  EXPECT_DEATH(LaunchAndWait(LaneExitsBeforeShuffleKernel, dim3(1), dim3(48), 0, nullptr, out),
               "the block ends inside it");
  EXPECT_EQ(cudaFree(out), cudaSuccess);
}

// Copies 32 floats (8 x 16 bytes) of `in` into shared memory by cp.async and writes what thread
// t reads there before (out[t]) and after (out[32 + t]) the wait.
__global__ void AsyncCopyKernel(float* out, const float* in) {
  EE_DYNAMIC_SHARED(smem);
  float* tile = reinterpret_cast<float*>(smem);
  if (threadIdx.x < 8) cuda::CpAsync16(tile + 4 * threadIdx.x, in + 4 * threadIdx.x, true);
  cuda::CpAsyncCommit();
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
  __syncthreads();
  cuda::CpAsyncWait<0>();
  __syncthreads();
  out[32 + threadIdx.x] = tile[threadIdx.x];
}

__global__ void MisalignedAsyncCopyKernel(const float* in) {
  EE_DYNAMIC_SHARED(smem);
  cuda::CpAsync16(smem + 8, in, true);
  cuda::CpAsyncWait<0>();
}

__global__ void MisalignedLdMatrixKernel() {
  EE_DYNAMIC_SHARED(smem);
  uint32_t r[4];
  cuda::LdMatrixX4(r, reinterpret_cast<const __nv_bfloat16*>(smem + 8));
}

// A 16-byte load from an address that is a multiple of 8 only (a fault on the device).
__global__ void MisalignedVectorLoadKernel(float* out, const float* in) {
  const float4 v = *reinterpret_cast<const float4*>(in + 2);
  out[threadIdx.x] = v.x;
}

// Two device buffers of 4 floats, x_ zeroed, a non-blocking stream as NCCL's is, and an event.
class CudaEmulationStreams : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&x_), 4 * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&y_), 4 * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMemset(x_, 0, 4 * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaStreamCreateWithFlags(&nccl_, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(cudaEventCreate(&done_), cudaSuccess);
  }
  void TearDown() override {
    cudaEventDestroy(done_);
    cudaStreamDestroy(nccl_);
    cudaFree(y_);
    cudaFree(x_);
  }
  float* x_ = nullptr;
  float* y_ = nullptr;
  cudaStream_t nccl_ = nullptr;
  cudaEvent_t done_ = nullptr;
};

// An upload from pinned memory on the backends' (legacy) stream lands for another stream's
// operation (an NCCL collective: eellm_emu::CompleteWorkFor is what they call first) only once
// that stream has waited for an event recorded after it, as NcclCommunicator::AfterCompute
// does; a stream created without cudaStreamNonBlocking is ordered after it anyway.
TEST_F(CudaEmulationStreams, AnotherStreamSeesAnUploadOnlyAfterWaitingForIt) {
  float* pinned = nullptr;
  ASSERT_EQ(
      cudaHostAlloc(reinterpret_cast<void**>(&pinned), 4 * sizeof(float), cudaHostAllocDefault),
      cudaSuccess);
  cudaStream_t blocking = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&blocking, 0), cudaSuccess);
  for (int round = 0; round < 2; ++round) {
    ASSERT_EQ(cudaMemset(x_, 0, 4 * sizeof(float)), cudaSuccess);
    for (int i = 0; i < 4; ++i) pinned[i] = static_cast<float>(i + 1 + 10 * round);
    ASSERT_EQ(cudaMemcpyAsync(x_, pinned, 4 * sizeof(float), cudaMemcpyHostToDevice, nullptr),
              cudaSuccess);
    if (round == 0) {
      eellm_emu::CompleteWorkFor(nccl_);  // no wait: the copy has not landed for it
      EXPECT_EQ(x_[0], 0.0f);
      ASSERT_EQ(cudaEventRecord(done_, nullptr), cudaSuccess);
      ASSERT_EQ(cudaStreamWaitEvent(nccl_, done_, 0), cudaSuccess);
      eellm_emu::CompleteWorkFor(nccl_);
    } else {
      eellm_emu::CompleteWorkFor(blocking);
    }
    for (int i = 0; i < 4; ++i) EXPECT_EQ(x_[i], static_cast<float>(i + 1 + 10 * round));
  }
  cudaStreamDestroy(blocking);
  cudaFreeHost(pinned);
}

__global__ void AddOneKernel(float* x) { x[threadIdx.x] += 1.0f; }

// The same for a kernel's and a GEMM's output: they run when a later operation of the legacy
// stream, a synchronisation or a wait for an event recorded after them completes them, so an NCCL
// collective that reads them without AfterCompute reads what was there before.
TEST_F(CudaEmulationStreams, AnotherStreamSeesAKernelOrGemmOutputOnlyAfterWaitingForIt) {
  cublasHandle_t blas = nullptr;
  ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);

  ASSERT_EQ(LaunchKernel(AddOneKernel, dim3(1), dim3(4), 0, nullptr, x_), cudaSuccess);
  eellm_emu::CompleteWorkFor(nccl_);  // no wait: the kernel has not run for it
  EXPECT_EQ(x_[0], 0.0f);
  ASSERT_EQ(cudaEventRecord(done_, nullptr), cudaSuccess);
  // A kernel after the record: a wait for the event does not cover it.
  ASSERT_EQ(LaunchKernel(AddOneKernel, dim3(1), dim3(4), 0, nullptr, x_), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(nccl_, done_, 0), cudaSuccess);
  eellm_emu::CompleteWorkFor(nccl_);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(x_[i], 1.0f) << i;
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(x_[i], 2.0f) << i;

  // y_ (2 x 2) = 3 * x_ (2 x 2) * x_.
  const float three = 3.0f, zero = 0.0f;
  ASSERT_EQ(
      cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &three, x_, 2, x_, 2, &zero, y_, 2),
      CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cudaEventRecord(done_, nullptr), cudaSuccess);
  eellm_emu::CompleteWorkFor(nccl_);  // its last wait came before the GEMM
  EXPECT_NE(y_[0], 24.0f);
  ASSERT_EQ(cudaStreamWaitEvent(nccl_, done_, 0), cudaSuccess);
  eellm_emu::CompleteWorkFor(nccl_);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y_[i], 24.0f) << i;

  cublasDestroy(blas);
}

__global__ void CopyKernel(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x]; }

// The other direction: the result of an operation on another stream (an NCCL collective, whose
// shim lands its results with DeferLanding) is there for the compute stream only once that stream
// waited for an event recorded after the operation (NcclCommunicator::ComputeAfter), or the host
// waited for such an event; the stream's own next operation sees it.
TEST_F(CudaEmulationStreams, TheComputeStreamSeesAnotherStreamsResultOnlyAfterWaitingForIt) {
  auto result = [&](float value) {  // an operation on `nccl_` that writes x_
    eellm_emu::DeferLanding(nccl_, [x = x_, value] {
      for (int i = 0; i < 4; ++i) x[i] = value;
    });
  };

  result(5.0f);
  ASSERT_EQ(LaunchKernel(CopyKernel, dim3(1), dim3(4), 0, nullptr, y_, x_), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  EXPECT_EQ(y_[0], 0.0f);  // no wait: the kernel read x_ before the result landed
  ASSERT_EQ(cudaEventRecord(done_, nccl_), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(nullptr, done_, 0), cudaSuccess);
  ASSERT_EQ(LaunchKernel(CopyKernel, dim3(1), dim3(4), 0, nullptr, y_, x_), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y_[i], 5.0f) << i;

  result(7.0f);  // the host waits for it
  ASSERT_EQ(cudaEventRecord(done_, nccl_), cudaSuccess);
  result(8.0f);  // after the record: not covered by the wait
  ASSERT_EQ(cudaEventSynchronize(done_), cudaSuccess);
  EXPECT_EQ(x_[0], 7.0f);
  eellm_emu::CompleteWorkFor(nccl_);  // the stream's next operation
  EXPECT_EQ(x_[0], 8.0f);
}

// Events and queued landings name a stream by an id no later stream reuses (a new stream may get
// a destroyed one's address): waiting for an event of a destroyed stream lands nothing of a later
// stream's.
TEST_F(CudaEmulationStreams, AnEventOfADestroyedStreamLandsNothingOfALaterOne) {
  cudaStream_t first = nullptr, second = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&first, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(done_, first), cudaSuccess);
  ASSERT_EQ(cudaStreamDestroy(first), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&second, cudaStreamNonBlocking), cudaSuccess);
  eellm_emu::DeferLanding(second, [x = x_] { *x = 42.0f; });
  ASSERT_EQ(cudaEventSynchronize(done_), cudaSuccess);
  EXPECT_EQ(*x_, 0.0f);
  ASSERT_EQ(cudaStreamSynchronize(second), cudaSuccess);
  EXPECT_EQ(*x_, 42.0f);
  cudaStreamDestroy(second);
}

// cp.async lands at the wait that covers it, the latest the device allows: a read before the wait
// sees the old bytes (0xFF, NaN, in fresh shared memory). cp.async and ldmatrix check alignment.
TEST(CudaEmulationLimits, AsyncCopiesLandAtTheWaitAndCheckAlignment) {
  float *out = nullptr, *in = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&in), 32 * sizeof(float)), cudaSuccess);
  std::vector<float> values(32);
  for (int i = 0; i < 32; ++i) values[i] = 1.5f + i;
  ASSERT_EQ(cudaMemcpy(in, values.data(), 32 * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(LaunchKernel(AsyncCopyKernel, dim3(1), dim3(32), 32 * sizeof(float), nullptr, out, in),
            cudaSuccess);
  std::vector<float> got(64);
  ASSERT_EQ(cudaMemcpy(got.data(), out, 64 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int t = 0; t < 32; ++t) {
    EXPECT_TRUE(std::isnan(got[t])) << "thread " << t << " read the copy before its wait";
    EXPECT_EQ(got[32 + t], values[t]) << "thread " << t;
  }
  EXPECT_DEATH(LaunchAndWait(MisalignedAsyncCopyKernel, dim3(1), dim3(32), 64, nullptr, in),
               "cp.async");
  EXPECT_DEATH(LaunchAndWait(MisalignedLdMatrixKernel, dim3(1), dim3(32), 64, nullptr),
               "ldmatrix row address");
  EXPECT_DEATH(LaunchAndWait(MisalignedVectorLoadKernel, dim3(1), dim3(32), 0, nullptr, out, in),
               "misaligned address");
  EXPECT_EQ(cudaFree(out), cudaSuccess);
  EXPECT_EQ(cudaFree(in), cudaSuccess);
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
