// cuDNN's attention graphs (engine/cuda/cudnn_attention.h) checked without a GPU, for the shapes
// the training path offers cuDNN (GQA and not, head dims 64 and 128, the 1.3B's shape, and the
// backward's gradients in one fused q, k, v buffer):
// - every tensor and operation descriptor of each pass (forward, both backwards) finalizes:
//   cuDNN checks each operation's operands there (matmul dims, broadcasts, types);
// - cuDNN's heuristics for an H200, from its device properties, offer each pass an engine whose
//   support checks accept the graph, and its plan compiles: a graph the fused attention engines
//   do not recognise fails here (the descriptors alone accept it).
// The GPU parity tests run the graphs and check their values.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_format.h"
#include "engine/cuda/cudnn_attention.h"
#include "nlohmann/json.hpp"

namespace eellm::cuda {
namespace {

class CudnnAttentionGraph : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(CudnnAttentionGraph, EveryPassDescriptorsFinalize) {
  const AttentionShape s = GetParam();
  ASSERT_TRUE(CudnnAttention::Offered(s));
  using Pass = CudnnAttention::Pass;
  const absl::Status fwd = CudnnAttention::CheckGraph(s, Pass::kForward);
  if (absl::IsUnimplemented(fwd)) GTEST_SKIP() << fwd.message();
  EXPECT_TRUE(fwd.ok()) << fwd;
  for (Pass pass : {Pass::kBackward, Pass::kBackwardAccumulatingDq}) {
    const absl::Status bwd = CudnnAttention::CheckGraph(s, pass);
    EXPECT_TRUE(bwd.ok()) << bwd;
  }
}

// The H200 of the GPU machine (tests/cudnn/h200_sxm.json: its limits as cuDNN's device
// properties take them).
std::string H200() {
  std::ifstream f(std::string(EELLM_SOURCE_DIR) + "/tests/cudnn/h200_sxm.json");
  std::stringstream text;
  text << f.rdbuf();
  return text.str();
}

// cuDNN compiles its attention kernels at plan time and loads them through the CUDA driver,
// which it opens as libcuda.so.1. Where there is no driver (CI), the toolkit's stub stands in,
// loaded here first so that cuDNN's dlopen finds it: plans then compile and fail only to load.
// False where there is neither.
bool CudaDriverOrStub() {
  if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL) != nullptr) return true;
#ifdef EELLM_CUDA_STUB_DRIVER
  return dlopen(EELLM_CUDA_STUB_DRIVER, RTLD_NOW | RTLD_GLOBAL) != nullptr;
#else
  return false;
#endif
}

// cuDNN's heuristics for an H200, without it (cuDNN >= 9.8 takes device properties): for each
// pass of each shape, an engine passes cuDNN's support checks for the graph and its plan compiles
// (and, with a CUDA driver, finalizes). This is where a graph cuDNN's fused attention engines do
// not take shows, e.g. a mask or softmax written in a form the engines do not recognise.
TEST_P(CudnnAttentionGraph, EveryPassHasAPlanOnAnH200) {
  const AttentionShape s = GetParam();
  using Pass = CudnnAttention::Pass;
  const std::string device = H200();
  ASSERT_FALSE(device.empty());
  if (!CudaDriverOrStub()) GTEST_SKIP() << "no CUDA driver and no stub libcuda";
  for (Pass pass : {Pass::kForward, Pass::kBackward, Pass::kBackwardAccumulatingDq}) {
    const absl::StatusOr<CudnnAttention::PlanInfo> plan = CudnnAttention::PlanFor(s, pass, device);
    if (absl::IsUnimplemented(plan.status())) GTEST_SKIP() << plan.status().message();
    ASSERT_TRUE(plan.ok()) << "pass " << static_cast<int>(pass) << ": " << plan.status();
    std::printf("pass %d: %s, workspace %s\n", static_cast<int>(pass), plan->engine.c_str(),
                plan->workspace_bytes < 0
                    ? "not known"
                    : absl::StrFormat("%.1f MiB", plan->workspace_bytes / 1048576.0).c_str());
  }
}

// On a GPU: prints its device properties as cuDNN reads them, and, on an H200, checks that the
// fixture above agrees with them where cuDNN's engines look (compute capability, SMs, shared
// memory, registers). Skips without a GPU.
TEST(CudnnDeviceProperties, TheH200FixtureMatchesThisGpu) {
  const absl::StatusOr<std::string> json = CudnnAttention::DeviceJson();
  if (!json.ok()) GTEST_SKIP() << json.status();
  std::printf("this GPU's cuDNN device properties: %s\n", json->c_str());
  const nlohmann::json here = nlohmann::json::parse(*json), fixture = nlohmann::json::parse(H200());
  if (here.value("deviceName", "").find("H200") == std::string::npos) {
    GTEST_SKIP() << "not an H200: " << here.value("deviceName", "");
  }
  for (const char* key : {"deviceVer", "multiProcessorCount", "maxSharedMemoryPerBlockOptin",
                          "reservedSharedMemoryPerBlock", "maxRegistersPerSM", "maxThreadsPerSM"}) {
    EXPECT_EQ(here.at(key), fixture.at(key)) << key;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudnnAttentionGraph,
                         ::testing::Values(AttentionShape{2, 64, 4, 4, 64},
                                           AttentionShape{2, 96, 8, 2, 128},
                                           AttentionShape{1, 256, 4, 1, 64},
                                           AttentionShape{8, 2048, 16, 16, 128},  // the 1.3B
                                           AttentionShape{8, 1024, 12, 12, 64},   // GPT-2
                                           // q, k, v (and their gradients) as the parts of one
                                           // fused buffer: rows of (hq + 2 hkv) d.
                                           AttentionShape{2, 96, 8, 2, 128, 1536, 1536},
                                           AttentionShape{4, 2048, 16, 16, 128, 6144, 6144}));

TEST(CudnnAttentionOffer, SmallOrOddHeadsStayOnTheFusedKernels) {
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 4, 4, 32}));      // d 32: the fused kernels
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 4, 4, 72 + 4}));  // not a multiple of 8
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 6, 4, 64}));      // heads not a multiple
  EXPECT_FALSE(CudnnAttention::Offered({2, 1, 4, 4, 64}));       // one token
  EXPECT_TRUE(CudnnAttention::Offered({2, 64, 6, 3, 96}));
}

}  // namespace
}  // namespace eellm::cuda
