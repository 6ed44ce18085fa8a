// cuDNN's attention graphs (engine/cuda/cudnn_attention.h) built without a GPU: every tensor and
// operation descriptor of each pass (forward, both backwards) must finalize, for the shapes the
// training path offers cuDNN (GQA and not, head dims 64 and 128, the 1.3B's shape). cuDNN checks
// each operation's operands there (matmul dims, broadcasts, types), so a wrong layout or operand
// fails here, before a GPU run. Engines and plans need the device: the GPU parity tests run the
// graphs.
#include <gtest/gtest.h>

#include "engine/cuda/cudnn_attention.h"

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

INSTANTIATE_TEST_SUITE_P(Shapes, CudnnAttentionGraph,
                         ::testing::Values(AttentionShape{2, 64, 4, 4, 64},
                                           AttentionShape{2, 96, 8, 2, 128},
                                           AttentionShape{1, 256, 4, 1, 64},
                                           AttentionShape{8, 2048, 16, 16, 128}));

TEST(CudnnAttentionOffer, SmallOrOddHeadsStayOnTheFusedKernels) {
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 4, 4, 32}));      // d 32: the fused kernels
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 4, 4, 72 + 4}));  // not a multiple of 8
  EXPECT_FALSE(CudnnAttention::Offered({2, 64, 6, 4, 64}));      // heads not a multiple
  EXPECT_FALSE(CudnnAttention::Offered({2, 1, 4, 4, 64}));       // one token
  EXPECT_TRUE(CudnnAttention::Offered({2, 64, 6, 3, 96}));
}

}  // namespace
}  // namespace eellm::cuda
