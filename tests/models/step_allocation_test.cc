// A training step allocates no device memory once the first step has run: workspaces, exit
// buffers and optimizer state are made up front or on the first step and then reused (GPU
// backends must not allocate inside the step). And it makes the host wait for the device only
// where it must. Counted through the ProfilingBackend.
#include <vector>

#include "engine/profiling_backend.h"
#include "gtest/gtest.h"
#include "models/exit_loss_weights.h"
#include "models/pipeline_executor.h"
#include "parallel/distributed_optimizer.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

TEST(StepAllocation, NoAllocationAfterTheFirstStep) {
  for (ModelStyle style : {ModelStyle::kLlama, ModelStyle::kGpt}) {
    auto cpu = testing::Cpu();
    ProfilingBackend be(cpu.get());
    ModelConfig c = testing::TinyConfig(style, 4);
    c.exits = {ExitConfig{}, ExitConfig{}};
    c.exits[0].layer = 1;
    c.exits[1].layer = 3;
    c.exits[1].kind = ExitKind::kMlp;
    auto model = Model::Create(c, &be);
    ASSERT_TRUE(model.ok()) << model.status();
    (*model)->InitRandom(3);
    auto ctx = ParallelContext::Single();
    DistributedOptimizer opt(&(*model)->params(), AdamWConfig{}, ctx.get(), false);
    const int micro = 2, seq = 8, microbatches = 2;
    PipelineExecutor exec(model->get(), ctx.get(), micro, seq, microbatches, true);
    const std::vector<int32_t> ids = testing::RandomTokens(micro * seq * microbatches, 11, 1);
    const std::vector<int32_t> targets = testing::RandomTokens(micro * seq * microbatches, 11, 2);
    const std::vector<float> w = ExitLossWeights(c, 0);
    auto step = [&] {
      (*model)->params().ZeroGrads();
      exec.TrainStep(ids.data(), targets.data(), w);
      return opt.Step(1e-3f);
    };
    step();
    const int64_t after_first = be.alloc_calls();
    EXPECT_GT(after_first, 0);
    for (int i = 0; i < 3; ++i) step();
    EXPECT_EQ(be.alloc_calls(), after_first)
        << (style == ModelStyle::kGpt ? "gpt" : "llama") << ": steps 2-4 allocated";
  }
}

// What a training step makes the host wait for (each wait empties a GPU's queue, so the host
// can no longer run ahead of it): the heads' losses, read back together at the step's end
// (models/loss_log.h), and the gradient norm (one read-back over every tensor). A read-back
// inside the step fails here (a position check per micro-batch, each head's losses did).
TEST(StepHostWaits, OneForTheLossesAndOneForTheNorm) {
  auto cpu = testing::Cpu();
  ProfilingBackend be(cpu.get());
  ModelConfig c = testing::TinyConfig(ModelStyle::kGpt, 4);
  c.exits = {ExitConfig{}, ExitConfig{}};
  c.exits[0].layer = 1;
  c.exits[1].layer = 3;
  auto model = Model::Create(c, &be);
  ASSERT_TRUE(model.ok()) << model.status();
  (*model)->InitRandom(3);
  auto ctx = ParallelContext::Single();
  DistributedOptimizer opt(&(*model)->params(), AdamWConfig{}, ctx.get(), false);
  const int micro = 2, seq = 8, microbatches = 3;
  PipelineExecutor exec(model->get(), ctx.get(), micro, seq, microbatches, true);
  const std::vector<int32_t> ids = testing::RandomTokens(micro * seq * microbatches, 11, 1);
  const std::vector<int32_t> targets = testing::RandomTokens(micro * seq * microbatches, 11, 2);
  const std::vector<float> w = ExitLossWeights(c, 0);
  for (int i = 0; i < 3; ++i) {
    const int64_t before = be.host_waits();
    (*model)->params().ZeroGrads();
    exec.TrainStep(ids.data(), targets.data(), w);
    opt.Step(1e-3f);
    EXPECT_EQ(be.host_waits() - before, 2) << "step " << i;
  }
}

}  // namespace
}  // namespace eellm
