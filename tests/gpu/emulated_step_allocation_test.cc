// The CUDA backend allocates no device memory inside a training step once the first step has
// run (its internal scratch included, which the ProfilingBackend-based step_allocation_test
// cannot see): cudaMalloc calls counted under the CPU emulation of CUDA, in fp32, bf16 and bf16
// with weight copies (head_dim 32, so attention runs the fused kernels and their scratch); and
// the host waits for the device only twice a step (the emulation's count of blocking calls made
// with device work pending). And bench train's count of the device memory a step took.
#include <vector>

#include "gtest/gtest.h"
#include "launch/bench_attention.h"
#include "launch/bench_train.h"
#include "models/exit_loss_weights.h"
#include "models/pipeline_executor.h"
#include "parallel/distributed_optimizer.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

TEST(EmulatedCudaStep, NoDeviceAllocationAfterTheFirstStep) {
  for (int mode = 0; mode < 3; ++mode) {
    for (ModelStyle style : {ModelStyle::kLlama, ModelStyle::kGpt}) {
      SCOPED_TRACE(::testing::Message() << (mode == 0   ? "cuda "
                                            : mode == 1 ? "cuda-bf16 "
                                                        : "cuda-bf16w ")
                                        << (style == ModelStyle::kGpt ? "gpt" : "llama"));
      auto be = MakeEmulatedCudaBackend(0, mode > 0, mode == 2);
      ASSERT_TRUE(be.ok()) << be.status();
      ModelConfig c = testing::TinyConfig(style, 4);
      c.hidden_size = 64;  // head_dim 32
      c.ffn_hidden_size = 96;
      c.vocab_size = 40;
      c.exits = {ExitConfig{}, ExitConfig{}};
      c.exits[0].layer = 1;
      c.exits[1].layer = 3;
      c.exits[1].kind = ExitKind::kMlp;
      // GPT's exit losses weighted by confidence: inside the cross-entropy, no read-back.
      c.confidence_weighted_exit_loss = style == ModelStyle::kGpt;
      auto model = Model::Create(c, be->get());
      ASSERT_TRUE(model.ok()) << model.status();
      (*model)->InitRandom(3);
      auto ctx = ParallelContext::Single();
      DistributedOptimizer opt(&(*model)->params(), AdamWConfig{}, ctx.get(), false);
      const int micro = 2, seq = 16, microbatches = 2;
      PipelineExecutor exec(model->get(), ctx.get(), micro, seq, microbatches, true);
      const auto ids = testing::RandomTokens(micro * seq * microbatches, c.vocab_size, 1);
      const auto targets = testing::RandomTokens(micro * seq * microbatches, c.vocab_size, 2);
      const std::vector<float> w = ExitLossWeights(c, 0);
      std::vector<double> losses;
      auto step = [&] {
        (*model)->params().ZeroGrads();
        losses.push_back(exec.TrainStep(ids.data(), targets.data(), w).final_loss);
        return opt.Step(1e-3f);
      };
      step();
      const int64_t after_first = EmulatedCudaMallocCalls();
      const int64_t waits_before = EmulatedHostWaits();
      for (int i = 0; i < 3; ++i) step();
      EXPECT_EQ(EmulatedCudaMallocCalls(), after_first) << "steps 2-4 called cudaMalloc";
      // The host waits twice a step, for the losses and for the gradient norm (as the
      // ProfilingBackend counts on the CPU, StepHostWaits): no synchronising upload, no other
      // read-back, no cudaFree.
      EXPECT_EQ(EmulatedHostWaits() - waits_before, 3 * 2) << "host waits in steps 2-4";
      EXPECT_LT(losses.back(), losses.front());  // and it trains
    }
  }
}

// bench train's device figure (free memory before minus the lowest after a step) covers what the
// benchmark took beyond its backend allocations: the bf16 weight copies and the backend's scratch.
TEST(EmulatedCudaStep, BenchCountsTheDeviceMemoryItTook) {
  auto be = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(be.ok()) << be.status();
  ModelConfig c = testing::TinyConfig(ModelStyle::kLlama, 2);
  c.hidden_size = 64;
  c.ffn_hidden_size = 96;
  c.vocab_size = 40;
  TrainBenchOptions o;
  o.batch = 2;
  o.seq = 16;
  o.steps = 1;
  o.warmup = 1;
  auto r = BenchTrainStep(c, be->get(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->peak_bytes, 0u);
  EXPECT_GT(r->device_bytes, static_cast<int64_t>(r->peak_bytes));
}

// bench attention on the CUDA code path: the decoding step (page tables in device memory, the
// grouped decoding kernel) reads every cached K and V row once, its bytes counted as such.
TEST(EmulatedCudaStep, BenchAttentionTimesADecodingStep) {
  auto be = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(be.ok()) << be.status();
  ModelConfig c = testing::TinyConfig(ModelStyle::kLlama, 1);
  c.hidden_size = 128;
  c.num_heads = 4;
  c.num_kv_heads = 2;  // head dimension 32
  AttentionBenchOptions o;
  o.batch = 3;
  o.seq = 40;
  o.steps = 1;
  o.warmup = 0;
  auto r = RunAttentionBenchmark(c, be->get(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->decode_seconds, 0);
  EXPECT_EQ(r->decode_bytes, 2.0 * 3 * 41 * 2 * 32 * 2);  // K and V, 41 rows, bf16
  EXPECT_GT(r->copy_bandwidth, 0);
}

}  // namespace
}  // namespace eellm
