// The heads compute logits a chunk of rows at a time (Workspace::logits holds one chunk): losses
// and every gradient equal those of a single chunk, for every head, with a loss mask and with
// the confidence-weighted exit loss (whose weights need every row's confidence first).
#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

struct Result {
  LossReport report;
  std::vector<float> grads;
};

Result TrainOnce(const ModelConfig& c, int chunk_rows) {
  auto cpu = testing::Cpu();
  auto model = Model::Create(c, cpu.get());
  EXPECT_TRUE(model.ok()) << model.status();
  testing::FillParams(**model, 11, 0.2f);
  (*model)->set_logits_chunk_rows(chunk_rows);
  const int b = 2, t = 5, n = b * t;
  auto ws = (*model)->MakeWorkspace(b, t);
  const std::vector<int32_t> ids = testing::RandomTokens(n, c.vocab_size, 1);
  const std::vector<int32_t> targets = testing::RandomTokens(n, c.vocab_size, 2);
  std::vector<float> mask(n, 1.0f);
  mask[3] = mask[7] = 0.0f;
  const std::vector<float> w(c.exits.size(), 0.7f);
  (*model)->params().ZeroGrads();
  Result r;
  r.report = (*model)->ForwardBackward(*ws, ids.data(), targets.data(), mask.data(), w, true);
  const ParamStore& ps = (*model)->params();
  r.grads.assign(ps.grads_data(), ps.grads_data() + ps.size());
  return r;
}

TEST(LogitsChunkTest, ChunkedHeadsEqualOneChunk) {
  for (ModelStyle style : {ModelStyle::kLlama, ModelStyle::kGpt}) {
    for (bool confidence : {false, true}) {
      ModelConfig c = testing::TinyConfig(style, 3);
      c.confidence_weighted_exit_loss = confidence;
      c.exits = {ExitConfig{}, ExitConfig{}};
      c.exits[0].layer = 1;
      c.exits[1].layer = 2;
      c.exits[1].kind = ExitKind::kMlp;
      c.exits[1].tied = true;
      const Result whole = TrainOnce(c, 0);    // 10 rows: one chunk
      const Result chunked = TrainOnce(c, 3);  // chunks of 3, 3, 3, 1 rows
      EXPECT_NEAR(chunked.report.final_loss, whole.report.final_loss,
                  1e-6 * std::fabs(whole.report.final_loss));
      for (size_t i = 0; i < c.exits.size(); ++i) {
        EXPECT_NEAR(chunked.report.exit_losses[i], whole.report.exit_losses[i],
                    1e-6 * std::fabs(whole.report.exit_losses[i]))
            << "exit " << i;
      }
      ASSERT_EQ(chunked.grads.size(), whole.grads.size());
      float scale = 0;
      for (float g : whole.grads) scale = std::max(scale, std::fabs(g));
      ASSERT_GT(scale, 0.0f);
      for (size_t i = 0; i < whole.grads.size(); ++i) {
        ASSERT_NEAR(chunked.grads[i], whole.grads[i], 1e-6f * scale)
            << "gradient element " << i << (confidence ? " (confidence-weighted)" : "");
      }
    }
  }
}

}  // namespace
}  // namespace eellm
