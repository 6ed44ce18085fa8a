// NcclCommunicator on a real GPU (label gpu): one rank, bootstrapped over a SelfCommunicator.
// Skips with a message when no GPU is present (as in CI).
#include <cuda_runtime.h>

#include <vector>

#include "gtest/gtest.h"
#include "parallel/comm/nccl_communicator.h"
#include "parallel/comm/self_communicator.h"
#include "tests/gpu/require_gpu.h"

namespace eellm {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

class NcclGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu() && testing::GpuRequired()) FAIL() << "no CUDA GPU, but EELLM_REQUIRE_GPU is set";
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA GPU on this machine: NCCL tests skipped";
  }
  float* Device(const std::vector<float>& host) {
    float* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(float)), cudaSuccess);
    cudaMemcpy(p, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
    buffers_.push_back(p);
    return p;
  }
  std::vector<float> Host(const float* p, size_t n) {
    std::vector<float> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost);
    return h;
  }
  void TearDown() override {
    for (float* p : buffers_) cudaFree(p);
  }
  std::vector<float*> buffers_;
};

TEST_F(NcclGpu, SingleRankCollectives) {
  SelfCommunicator boot;
  auto nccl = NcclCommunicator::Create(&boot);
  ASSERT_EQ(nccl->size(), 1);
  EXPECT_EQ(nccl->name(), "nccl");
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 7.0f};
  float* a = Device(v);
  nccl->AllReduce(a, v.size(), ReduceOp::kSum);
  EXPECT_EQ(Host(a, v.size()), v);
  nccl->IAllReduce(a, v.size(), ReduceOp::kMax)->Wait();
  EXPECT_EQ(Host(a, v.size()), v);
  float* b = Device(std::vector<float>(v.size(), -9.0f));
  nccl->AllGather(a, b, v.size());
  EXPECT_EQ(Host(b, v.size()), v);
  float* c = Device(std::vector<float>(v.size(), -9.0f));
  nccl->ReduceScatter(a, c, v.size(), ReduceOp::kSum);
  EXPECT_EQ(Host(c, v.size()), v);
  nccl->Broadcast(a, v.size() * sizeof(float), 0);
  EXPECT_EQ(Host(a, v.size()), v);
  nccl->Barrier();
  auto sub = nccl->Subgroup({0});
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->rank(), 0);
  sub->AllReduce(a, v.size(), ReduceOp::kSum);
  EXPECT_EQ(Host(a, v.size()), v);
}

}  // namespace
}  // namespace eellm
