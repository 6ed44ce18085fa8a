// A training step allocates no device memory once the first step has run: workspaces, exit
// buffers and optimizer state are made up front or on the first step and then reused (GPU
// backends must not allocate inside the step). And it makes the host wait for the device only
// where it must. Counted through the ProfilingBackend.
#include <memory>
#include <vector>

#include "engine/core/status.h"
#include "engine/profiling_backend.h"
#include "gtest/gtest.h"
#include "models/exit_loss_weights.h"
#include "models/pipeline_executor.h"
#include "parallel/distributed_optimizer.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

// A tiny model of `style` with two exits (a norm exit after layer 1, an MLP exit after layer 3)
// on a ProfilingBackend over the CPU, its optimizer and an executor over `microbatches`
// micro-batches of 2 x 8 tokens; Step() runs one training step.
class TinyTraining {
 public:
  TinyTraining(ModelStyle style, int microbatches) : be_(cpu_.get()) {
    ModelConfig c = testing::TinyConfig(style, 4);
    c.exits = {ExitConfig{}, ExitConfig{}};
    c.exits[0].layer = 1;
    c.exits[1].layer = 3;
    c.exits[1].kind = ExitKind::kMlp;
    auto model = Model::Create(c, &be_);
    EE_CHECK_OK(model.status());
    model_ = std::move(*model);
    model_->InitRandom(3);
    opt_ =
        std::make_unique<DistributedOptimizer>(&model_->params(), AdamWConfig{}, ctx_.get(), false);
    const int micro = 2, seq = 8, n = micro * seq * microbatches;
    exec_ = std::make_unique<PipelineExecutor>(model_.get(), ctx_.get(), micro, seq, microbatches,
                                               true);
    ids_ = testing::RandomTokens(n, 11, 1);
    targets_ = testing::RandomTokens(n, 11, 2);
    w_ = ExitLossWeights(c, 0);
  }
  void Step() {
    model_->params().ZeroGrads();
    exec_->TrainStep(ids_.data(), targets_.data(), w_);
    opt_->Step(1e-3f);
  }
  const ProfilingBackend& backend() const { return be_; }

 private:
  std::unique_ptr<Backend> cpu_ = testing::Cpu();
  ProfilingBackend be_;
  std::unique_ptr<ParallelContext> ctx_ = ParallelContext::Single();
  std::unique_ptr<Model> model_;
  std::unique_ptr<DistributedOptimizer> opt_;
  std::unique_ptr<PipelineExecutor> exec_;
  std::vector<int32_t> ids_, targets_;
  std::vector<float> w_;
};

TEST(StepAllocation, NoAllocationAfterTheFirstStep) {
  for (ModelStyle style : {ModelStyle::kLlama, ModelStyle::kGpt}) {
    TinyTraining t(style, 2);
    t.Step();
    const int64_t after_first = t.backend().alloc_calls();
    EXPECT_GT(after_first, 0);
    for (int i = 0; i < 3; ++i) t.Step();
    EXPECT_EQ(t.backend().alloc_calls(), after_first)
        << (style == ModelStyle::kGpt ? "gpt" : "llama") << ": steps 2-4 allocated";
  }
}

// What a training step makes the host wait for (each wait empties a GPU's queue, so the host
// can no longer run ahead of it): the heads' losses, read back together at the step's end
// (models/loss_log.h), and the gradient norm (one read-back over every tensor). A read-back
// inside the step fails here (a position check per micro-batch, each head's losses did).
TEST(StepHostWaits, OneForTheLossesAndOneForTheNorm) {
  TinyTraining t(ModelStyle::kGpt, 3);
  for (int i = 0; i < 3; ++i) {
    const int64_t before = t.backend().host_waits();
    t.Step();
    EXPECT_EQ(t.backend().host_waits() - before, 2) << "step " << i;
  }
}

}  // namespace
}  // namespace eellm
