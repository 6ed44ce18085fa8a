// The run and benchmark configs shipped in configs/ load (a typo in one would otherwise surface
// only on the machine that runs it, e.g. the GPU machine's tools/gpu_check.sh), and the ones
// chosen for their attention head dimension have it.
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "launch/train_config.h"

namespace eellm {
namespace {

TEST(ShippedConfigs, EveryConfigLoads) {
  int loaded = 0;
  for (const auto& entry :
       std::filesystem::recursive_directory_iterator(std::string(EELLM_SOURCE_DIR) + "/configs")) {
    if (entry.path().extension() != ".json") continue;
    SCOPED_TRACE(entry.path().string());
    auto rc = LoadRunConfig(entry.path().string());
    EXPECT_TRUE(rc.ok()) << rc.status();
    ++loaded;
  }
  EXPECT_GT(loaded, 0);
}

// tools/gpu_check.sh trains it with cuDNN's attention and with the fused kernels: cuDNN is
// offered head dims 64 to 128 (engine/cuda/cudnn_attention.h).
TEST(ShippedConfigs, HeadDim64DemoIsOfferedToCudnn) {
  auto rc = LoadRunConfig(std::string(EELLM_SOURCE_DIR) + "/configs/kjv_head_dim64.json");
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ(rc->model.hidden_size / rc->model.num_heads, 64);
  EXPECT_EQ(rc->train.seq_len % 128, 0);  // (cuDNN <= 9.15 offers the backward only then)
}

}  // namespace
}  // namespace eellm
