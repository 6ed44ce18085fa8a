// Early-exit generation (prefill, KV-cache decoding, exits firing, KV recomputation of exited
// tokens, sampling) on the CUDA backend's code under the CPU emulation of CUDA, token for token
// against the CPU backend. Together with the parity suite and the emulated layout tests this
// covers the device paths of inference as well as training.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "models/generator.h"
#include "tests/gpu/bf16_reference_backend.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/gpu/parity_tolerances.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

class EmulatedGeneration : public ::testing::TestWithParam<ModelStyle> {};

// Generates `count` tokens after `prompt` on both models (early exit at `threshold`, sampling
// `sp`) and expects the same tokens, exits and depths. Returns whether the reference run mixed
// tokens that exited early with tokens that ran the full depth.
bool ExpectSameGeneration(Model* want_model, Model* got_model, const std::vector<int32_t>& prompt,
                          int count, float threshold, const SamplingParams& sp) {
  EarlyExitParams ee;
  ee.threshold = threshold;
  Generator gw(want_model, 32), gg(got_model, 32);
  auto want = gw.Generate(prompt, count, -1, sp, ee);
  auto got = gg.Generate(prompt, count, -1, sp, ee);
  EXPECT_TRUE(want.ok() && got.ok());
  if (!want.ok() || !got.ok()) return false;
  EXPECT_EQ(got->tokens, want->tokens) << "threshold " << threshold;
  EXPECT_EQ(got->exit_index, want->exit_index) << "threshold " << threshold;
  EXPECT_EQ(got->depth, want->depth) << "threshold " << threshold;
  int early = 0;
  for (int e : want->exit_index) early += e >= 0;
  return early > 0 && early < static_cast<int>(want->exit_index.size());
}

// Generates `reqs` as one batch on `got` and expects, for every sequence, the tokens and exits
// of `want`'s batch (when given) and of the sequence generated alone on `alone` (when given).
// Returns how many tokens exited early.
int ExpectBatch(Generator& got, Generator* want, Generator* alone,
                const std::vector<GenerationRequest>& reqs, const std::string& what) {
  const auto g = *got.GenerateBatch(reqs);
  const auto w = want != nullptr ? *want->GenerateBatch(reqs) : std::vector<GenerationResult>{};
  int early = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (want != nullptr) {
      EXPECT_EQ(g[i].tokens, w[i].tokens) << what << " sequence " << i;
      EXPECT_EQ(g[i].exit_index, w[i].exit_index) << what << " sequence " << i;
    }
    if (alone != nullptr) {
      auto one = *alone->GenerateBatch({reqs[i]});
      EXPECT_EQ(g[i].tokens, one[0].tokens) << what << " sequence " << i << " alone";
      EXPECT_EQ(g[i].exit_index, one[0].exit_index) << what << " sequence " << i << " alone";
    }
    for (int e : g[i].exit_index) early += e >= 0;
  }
  return early;
}

TEST_P(EmulatedGeneration, MatchesCpuTokenForToken) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  auto cpu = testing::Cpu();
  auto emu = MakeEmulatedCudaBackend(0, false);
  ASSERT_TRUE(emu.ok()) << emu.status();
  auto mc = *Model::Create(c, cpu.get());
  auto me = *Model::Create(c, emu->get());
  testing::FillParams(*mc, 31, 0.8f);
  testing::FillParams(*me, 31, 0.8f);
  const auto prompt = testing::RandomTokens(4, c.vocab_size, 32);
  SamplingParams greedy, sampled;
  sampled.temperature = 0.9f;
  sampled.top_k = 8;
  sampled.seed = 7;
  int mixed = 0;  // runs where some tokens exited early and some ran the full depth
  for (float threshold : {1.0f, 0.3f, 0.45f, 0.6f, 0.75f}) {
    for (const SamplingParams& sp : {greedy, sampled}) {
      mixed += ExpectSameGeneration(mc.get(), me.get(), prompt, 24, threshold, sp);
    }
  }
  EXPECT_GT(mixed, 0) << "no threshold made some tokens exit early and others not";
}

// cuda-bf16w keeps GEMM operands, q, k, v and the KV cache in bf16, in prefill and KV-cache
// decoding alike. Its logits stay within the bf16 model tolerance of cuda-bf16's (whose GEMMs
// round the same fp32 values once; bf16w rounds GEMM outputs too, and q, k again after RoPE) and
// of the CPU's, at every step of a decode fed the same tokens (the CPU's
// greedy choices). A wrong dtype anywhere in the decode path gives garbage.
TEST_P(EmulatedGeneration, Bf16OperandsDecodeCloseToBf16Gemms) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  auto cpu = testing::Cpu();
  auto bf16w = MakeEmulatedCudaBackend(0, true, true);
  auto bf16 = MakeEmulatedCudaBackend(0, true, false);
  ASSERT_TRUE(bf16w.ok() && bf16.ok());
  ASSERT_EQ((*bf16w)->operand_dtype(), DType::kBF16);
  auto mc = *Model::Create(c, cpu.get());
  auto mw = *Model::Create(c, bf16w->get());
  auto mb = *Model::Create(c, bf16->get());
  for (Model* m : {mc.get(), mw.get(), mb.get()}) testing::FillParams(*m, 31, 0.8f);
  Generator gc(mc.get(), 32), gw(mw.get(), 32), gb(mb.get(), 32);
  const EarlyExitParams full;  // threshold 1: every token from the final head
  std::vector<int32_t> next = testing::RandomTokens(4, c.vocab_size, 32);
  for (int step = 0; step < 12; ++step) {
    const StepResult want = gc.Step(next, full), got = gw.Step(next, full);
    // As the bf16 model-step parity (model_parity_test.cc): 8-bit operands through 2 layers of
    // a random model (large activations) move logits by up to 5% of the largest.
    const testing::Tol bf16_model{1e-1, 1e-1};
    EXPECT_TRUE(testing::Close(got.logits, gb.Step(next, full).logits, bf16_model))
        << "step " << step;
    EXPECT_TRUE(testing::Close(got.logits, want.logits, bf16_model)) << "step " << step;
    next = {static_cast<int32_t>(std::max_element(want.logits.begin(), want.logits.end()) -
                                 want.logits.begin())};
  }
}

// cuda-bf16w against the CPU rounded where it rounds (Bf16ReferenceBackend, as in the model
// parity): early-exit generation token for token, exits and depths included, and every decode
// step's logits within fp32 summation noise. At head_dim 4 (the per-head attention path) and
// head_dim 32, where prefill and every decode step (one query against the bf16 KV cache, at
// q_offset > 0) run the fused attention forward. (Under the emulation the GEMMs are the same
// BLAS calls on the same bf16 values, so the logits differ by fp32 summation order only: an
// unrounded sum of P in the fused forward fails them by 100x.)
TEST_P(EmulatedGeneration, Bf16OperandsMatchRoundingReference) {
  for (int head_dim : {4, 32}) {
    SCOPED_TRACE(head_dim);
    ModelConfig c = testing::ConfigWithExits(GetParam());
    c.hidden_size = c.num_heads * head_dim;
    c.ffn_hidden_size = 3 * c.hidden_size / 2;
    auto ref = std::make_unique<testing::Bf16ReferenceBackend>(
        testing::Cpu(), [](int d) { return d == 32 || d == 64 || d == 128; });
    auto bf16w = MakeEmulatedCudaBackend(0, true, true);
    ASSERT_TRUE(bf16w.ok());
    auto mr = *Model::Create(c, ref.get());
    auto mw = *Model::Create(c, bf16w->get());
    for (Model* m : {mr.get(), mw.get()}) testing::FillParams(*m, 41, 0.8f);
    const auto prompt = testing::RandomTokens(5, c.vocab_size, 42);
    // Logits of a decode fed the same tokens: fp32 summation noise (kGemmFp32) and no more.
    Generator gr(mr.get(), 32), gw(mw.get(), 32);
    const EarlyExitParams full;
    std::vector<int32_t> next = prompt;
    for (int step = 0; step < 10; ++step) {
      const StepResult want = gr.Step(next, full), got = gw.Step(next, full);
      EXPECT_TRUE(testing::Close(got.logits, want.logits, testing::kGemmFp32)) << "step " << step;
      next = {static_cast<int32_t>(std::max_element(want.logits.begin(), want.logits.end()) -
                                   want.logits.begin())};
    }
    int mixed = 0;
    for (float threshold : {0.45f, 0.75f, 0.9f, 0.97f, 0.995f}) {
      mixed += ExpectSameGeneration(mr.get(), mw.get(), prompt, 20, threshold, SamplingParams());
    }
    EXPECT_GT(mixed, 0) << "no threshold made some tokens exit early and others not";
  }
}

// Batched generation (four sequences of mixed lengths, thresholds and sampling, prefill in two
// groups) on the CUDA code: fp32 matches the CPU's batch token for token; bf16w (bf16 operands,
// KV caches and exit rows) matches each sequence generated alone on bf16w.
TEST_P(EmulatedGeneration, BatchesMatchCpuAndSequencesAlone) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  auto cpu = testing::Cpu();
  auto emu = MakeEmulatedCudaBackend(0, false);
  auto bf16w = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(emu.ok() && bf16w.ok());
  auto mc = *Model::Create(c, cpu.get());
  auto me = *Model::Create(c, emu->get());
  auto mw = *Model::Create(c, bf16w->get());
  for (Model* m : {mc.get(), me.get(), mw.get()}) testing::FillParams(*m, 61, 0.8f);
  const auto reqs = testing::MixedRequests(c);
  Generator gc(mc.get(), 32, 4), ge(me.get(), 32, 4), gw(mw.get(), 32, 4), alone(mw.get(), 32);
  ExpectBatch(ge, &gc, nullptr, reqs, "fp32");
  EXPECT_GT(ExpectBatch(gw, nullptr, &alone, reqs, "bf16w"), 5)
      << "too few early exits to test the batched exit paths";
}

// The same batches at head_dim 32, where every pass of the batch runs its sequences' attention
// in one launch of the fused kernel (CudaBackend::PagedAttentionPass) over their paged caches:
// bf16w matches the CPU rounded where it rounds token for token, and each sequence generated
// alone.
TEST_P(EmulatedGeneration, FusedBatchesMatchRoundingReferenceAndSequencesAlone) {
  ModelConfig c = testing::ConfigWithExits(GetParam());
  c.hidden_size = c.num_heads * 32;
  c.ffn_hidden_size = 3 * c.hidden_size / 2;
  auto ref = std::make_unique<testing::Bf16ReferenceBackend>(
      testing::Cpu(), [](int d) { return d == 32 || d == 64 || d == 128; });
  auto bf16w = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(bf16w.ok());
  auto mr = *Model::Create(c, ref.get());
  auto mw = *Model::Create(c, bf16w->get());
  for (Model* m : {mr.get(), mw.get()}) testing::FillParams(*m, 61, 0.8f);
  const auto reqs = testing::MixedRequests(c);
  Generator gr(mr.get(), 32, 4), gw(mw.get(), 32, 4), alone(mw.get(), 32);
  EXPECT_GT(ExpectBatch(gw, &gr, &alone, reqs, "fused"), 5)
      << "too few early exits to test the batched exit paths";
}

// KvBytesPerToken is what a KV cache token costs on the device: a generator with 1,024 more
// tokens of KV cache takes 1,024 x it more of the (emulated) device's free memory, in fp32 and
// bf16 operands, with the block exit's K and V counted.
TEST_P(EmulatedGeneration, KvBytesPerTokenIsWhatTheCacheAllocates) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  for (const bool bf16 : {false, true}) {
    auto emu = MakeEmulatedCudaBackend(0, bf16, bf16);
    ASSERT_TRUE(emu.ok()) << emu.status();
    Backend* be = emu->get();
    auto m = *Model::Create(c, be, StageSpec{}, TpSpec{}, ModelGradients::kNone);
    auto taken = [&](int kv_tokens) {
      const int64_t before = be->AvailableMemoryBytes();
      Generator g(m.get(), 32, 4, kv_tokens);
      return before - be->AvailableMemoryBytes();
    };
    const int64_t per_token = Generator::KvBytesPerToken(*m);
    // The 4 layers' and the block exit's K and V in the operand dtype, and the fp32 pending
    // hidden state.
    const int64_t kv_row = int64_t{c.num_kv_heads} * c.head_dim() * (bf16 ? 2 : 4);
    EXPECT_EQ(per_token, (c.num_layers + 1) * 2 * kv_row + c.hidden_size * 4) << bf16;
    EXPECT_EQ(taken(2048) - taken(1024), 1024 * per_token) << bf16;
  }
}

// The device bytes a Generator(m, capacity, sequences, kv_tokens) takes.
int64_t GeneratorBytes(Model* m, int capacity, int sequences, int kv_tokens) {
  Backend* be = m->backend();
  const int64_t before = be->AvailableMemoryBytes();
  Generator g(m, capacity, sequences, kv_tokens);
  return before - be->AvailableMemoryBytes();
}

// PlannedBytes grows as the generator's allocations do with the context, the sequences and the
// KV cache, on the whole model, on a pipeline's second stage (layers 3-4 and the exits it holds)
// and on a tensor-parallel rank; what it leaves out (fixed by the model) is a small part of the
// total.
TEST_P(EmulatedGeneration, PlannedBytesFollowTheAllocations) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  auto emu = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(emu.ok()) << emu.status();
  Backend* be = emu->get();
  // The tensor-parallel rank is only constructed (no communicator): a generator allocates
  // without communicating.
  const std::pair<StageSpec, TpSpec> parts[] = {
      {StageSpec{}, TpSpec{}}, {StageSpec{1, 2}, TpSpec{}}, {StageSpec{}, TpSpec{1, 2, nullptr}}};
  for (const auto& [stage, tp] : parts) {
    auto m = *Model::Create(c, be, stage, tp, ModelGradients::kNone);
    struct Size {
      int capacity, sequences, kv_tokens;
    };
    auto taken = [&](const Size& s) {
      return GeneratorBytes(m.get(), s.capacity, s.sequences, s.kv_tokens);
    };
    auto planned = [&](const Size& s) {
      return Generator::PlannedBytes(*m, s.capacity, s.sequences, s.kv_tokens);
    };
    // Pairs of the same KV cache kind: a whole context per slot, or pages on demand.
    const std::pair<Size, Size> pairs[] = {
        {{64, 2, 0}, {512, 2, 0}},      {{64, 2, 0}, {64, 9, 0}},
        {{64, 2, 0}, {512, 9, 0}},      {{64, 2, 0}, {8, 80, 0}},
        {{64, 2, 1024}, {64, 2, 4096}}, {{64, 2, 1024}, {256, 70, 1024}}};
    for (const auto& [a, b] : pairs) {
      EXPECT_EQ(taken(b) - taken(a), planned(b) - planned(a))
          << stage.stage << " " << tp.size << ": " << b.capacity << " " << b.sequences << " "
          << b.kv_tokens;
    }
    const Size big{4096, 8, 0};
    EXPECT_LE(planned(big), taken(big));
    EXPECT_GT(planned(big), 0.9 * taken(big)) << stage.stage << " " << tp.size;
  }
}

// A tensor-parallel rank's generator holds activations of its share of the heads and FFN
// columns, and logits of its share of the vocabulary (beside every rank's, gathered). Against
// the whole model, each activation row saves half of q, the attention output and the FFN
// activations, in the 4 layers' block and the block exit, and the MLP exit's FFN activations;
// k and v halve where there are 2 KV heads (GPT), and a single one is replicated (Llama).
TEST_P(EmulatedGeneration, TensorParallelRankHoldsItsShare) {
  const ModelConfig c = testing::ConfigWithExits(GetParam());
  auto emu = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(emu.ok()) << emu.status();
  Backend* be = emu->get();
  auto whole = *Model::Create(c, be, StageSpec{}, TpSpec{}, ModelGradients::kNone);
  auto rank = *Model::Create(c, be, StageSpec{}, TpSpec{1, 2, nullptr}, ModelGradients::kNone);
  // What the whole model's generator takes beyond the rank's, for one size.
  auto saved = [&](int capacity, int sequences) {
    return GeneratorBytes(whole.get(), capacity, sequences, 1024) -
           GeneratorBytes(rank.get(), capacity, sequences, 1024);
  };
  const int64_t d = c.head_dim(), kv_saved = c.num_kv_heads == 1 ? 0 : c.num_kv_heads / 2;
  const int64_t blocks = 2, mlps = 3;  // 2 blocks' MLPs and the MLP exit's
  const int64_t ffn_tensors = GetParam() == ModelStyle::kLlama ? 3 : 2;  // h1, (h3,) act
  const int64_t row_saved =
      2 * (blocks * (c.num_heads / 2 * d * 2 + kv_saved * d * 2) +
           mlps * ffn_tensors * (c.ffn_hidden_size / 2));  // bf16 operands: 2 bytes each
  // The same KV cache (1,024 tokens by request) and sequences, 64 or 512 rows a pass.
  EXPECT_EQ(saved(512, 2) - saved(64, 2), (512 - 64) * row_saved);
  // 2 or 70 sequences: 64 or 280 rows a pass, and 64 or 70 + kMaxDraftTokens + 1 head rows, each
  // with the rank's 8 logits and the 16 gathered where the whole model has 16.
  const int64_t head_rows = 70 + kMaxDraftTokens + 1 - 64;
  EXPECT_EQ(saved(64, 70) - saved(64, 2), (280 - 64) * row_saved - head_rows * 8 * 4);
}

INSTANTIATE_TEST_SUITE_P(Styles, EmulatedGeneration,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

}  // namespace
}  // namespace eellm
