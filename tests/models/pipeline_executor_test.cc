// PipelineExecutor with model chunks (interleaved 1F1B, virtual stages) on one rank: the chunks
// pass activations and gradients to each other locally; losses and gradients must equal those of
// the whole model run by the same executor without chunks, and the records held at once must
// stay within the schedule's MaxInFlight.
#include "models/pipeline_executor.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/parallel_context.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::Cpu;
using testing::RandomTokens;
using testing::TinyConfig;

ModelConfig ConfigWithExits() {
  ModelConfig c = TinyConfig(ModelStyle::kGpt, 4);
  ExitConfig x;
  x.layer = 1;
  x.kind = ExitKind::kNorm;
  x.tied = true;
  x.loss_weight = 0.5f;
  c.exits.push_back(x);
  ExitConfig y;
  y.layer = 3;
  y.kind = ExitKind::kMlp;
  y.position = ExitPosition::kPre;
  y.loss_weight = 0.3f;
  c.exits.push_back(y);
  return c;
}

// The model as `chunks` chunks (chunk k: virtual stage k of a one-rank pipeline; 1: the whole
// model; `depth` > 0: of the model cut after that layer), initialised from `seed`, gradients
// zeroed; `parts` gets their pointers (empty after a failure).
std::vector<std::unique_ptr<Model>> MakeChunks(const ModelConfig& c, Backend* be, int chunks,
                                               uint64_t seed, std::vector<Model*>* parts,
                                               int depth = 0) {
  std::vector<std::unique_ptr<Model>> models;
  parts->clear();
  for (int k = 0; k < chunks; ++k) {
    auto m = Model::Create(c, be, StageSpec{k, chunks, depth});
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return {};
    (*m)->InitRandom(seed);
    (*m)->params().ZeroGrads();
    parts->push_back(m->get());
    models.push_back(std::move(*m));
  }
  return models;
}

// A step's host inputs: `microbatches` microbatches of one row of 8 tokens, ids and targets
// drawn from `seed` and `seed + 1`.
struct StepInputs {
  static constexpr int kMicro = 1, kSeq = 8;
  int microbatches = 0;
  std::vector<int32_t> ids, targets;
  // An executor of `parts` over these microbatches.
  PipelineExecutor Executor(std::vector<Model*> parts, ParallelContext* ctx, bool place) const {
    return PipelineExecutor(std::move(parts), ctx, kMicro, kSeq, microbatches, place);
  }
};
StepInputs Inputs(const ModelConfig& c, int microbatches, uint64_t seed) {
  const int n = StepInputs::kMicro * StepInputs::kSeq * microbatches;
  return {microbatches, RandomTokens(n, c.vocab_size, seed),
          RandomTokens(n, c.vocab_size, seed + 1)};
}

// The heads' losses are read back once, at the step's end (models/loss_log.h): the step's
// report is, bit for bit, what the executor's accumulation of each micro-batch's own report (a
// ForwardBackward that reads its losses back at once) gives: mean losses over the micro-batches,
// objective the sum of the reports' objectives.
TEST(Executor, DeferredLossesEqualThePerMicrobatchReports) {
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const int microbatches = 3, n = StepInputs::kMicro * StepInputs::kSeq;
  const StepInputs in = Inputs(c, microbatches, 21);
  const std::vector<float> w = {0.5f, 0.3f};
  std::vector<Model*> parts, alone_parts;
  auto models = MakeChunks(c, be.get(), 1, 11, &parts);
  auto alone = MakeChunks(c, be.get(), 1, 11, &alone_parts);
  PipelineExecutor exec = in.Executor(parts, ctx.get(), /*place=*/false);
  const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
  auto ws = alone_parts[0]->MakeWorkspace(StepInputs::kMicro, StepInputs::kSeq);
  const std::vector<float> mask(n, 1.0f);
  LossReport want;
  want.exit_losses.assign(c.exits.size(), 0.0);
  for (int m = 0; m < microbatches; ++m) {
    const LossReport r =
        alone_parts[0]->ForwardBackward(*ws, in.ids.data() + m * n, in.targets.data() + m * n,
                                        mask.data(), w, true, 1.0f / microbatches);
    EXPECT_GT(r.final_loss, 0.0);
    want.final_loss += r.final_loss / microbatches;
    for (size_t i = 0; i < c.exits.size(); ++i)
      want.exit_losses[i] += r.exit_losses[i] / microbatches;
    want.objective += r.objective;
  }
  EXPECT_EQ(got.final_loss, want.final_loss);
  EXPECT_EQ(got.exit_losses, want.exit_losses);
  EXPECT_EQ(got.objective, want.objective);
  // With exits in the bubbles (two reports a micro-batch), chunks and EE-Tuning: the log is
  // emptied by each pass, so a second step on the same parameters (no optimizer step) reports
  // exactly the first's, and an evaluation exactly a fresh executor's.
  auto expect_equal = [](const LossReport& a, const LossReport& b) {
    EXPECT_EQ(a.final_loss, b.final_loss);
    EXPECT_EQ(a.exit_losses, b.exit_losses);
    EXPECT_EQ(a.objective, b.objective);
  };
  for (int chunks : {1, 2}) {
    for (int variant = 0; variant < 3; ++variant) {  // place exits, not, EE-Tuning
      SCOPED_TRACE(::testing::Message() << chunks << " chunk(s), variant " << variant);
      std::vector<Model*> p;
      auto ms = MakeChunks(c, be.get(), chunks, 11, &p);
      PipelineExecutor e = in.Executor(p, ctx.get(), variant != 1);
      if (variant == 2) e.set_frozen_backbone(true, /*stop_at_deepest_exit=*/false);
      const LossReport first = e.TrainStep(in.ids.data(), in.targets.data(), w);
      EXPECT_GT(first.exit_losses[1], 0.0);
      expect_equal(e.TrainStep(in.ids.data(), in.targets.data(), w), first);
      if (variant != 2) {
        EXPECT_EQ(first.final_loss, got.final_loss);
        EXPECT_EQ(first.exit_losses, got.exit_losses);
      }
      const LossReport eval = e.Evaluate(in.ids.data(), in.targets.data());
      std::vector<Model*> q;
      auto fresh_models = MakeChunks(c, be.get(), chunks, 11, &q);
      PipelineExecutor fresh = in.Executor(q, ctx.get(), variant != 1);
      expect_equal(eval, fresh.Evaluate(in.ids.data(), in.targets.data()));
    }
  }
}

class InterleavedExecutor : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(InterleavedExecutor, MatchesWholeModelAndStaysWithinMaxInFlight) {
  const auto [chunks, place_exits] = GetParam();
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const StepInputs in = Inputs(c, 4, 1);
  const std::vector<float> w = {0.5f, 0.3f};

  std::vector<Model*> one;
  auto whole = MakeChunks(c, be.get(), 1, 7, &one);
  ASSERT_EQ(one.size(), 1u);
  PipelineExecutor ref = in.Executor({one[0]}, ctx.get(), place_exits);
  const LossReport want = ref.TrainStep(in.ids.data(), in.targets.data(), w);
  const LossReport want_eval = ref.Evaluate(in.ids.data(), in.targets.data());

  std::vector<Model*> parts;
  auto models = MakeChunks(c, be.get(), chunks, 7, &parts);
  ASSERT_EQ(parts.size(), static_cast<size_t>(chunks));
  PipelineExecutor exec = in.Executor(parts, ctx.get(), place_exits);
  EXPECT_EQ(exec.schedule().chunks, chunks);
  const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
  EXPECT_NEAR(got.final_loss, want.final_loss, 1e-5 * want.final_loss);
  ASSERT_EQ(got.exit_losses.size(), want.exit_losses.size());
  for (size_t i = 0; i < want.exit_losses.size(); ++i) {
    EXPECT_NEAR(got.exit_losses[i], want.exit_losses[i], 1e-5 * want.exit_losses[i]);
  }
  EXPECT_GE(exec.peak_in_flight(), 2);  // microbatches really overlap
  EXPECT_LE(exec.peak_in_flight(), MaxInFlight(exec.schedule(), 0));

  // Gradients by tensor name; the word embedding's copies (first chunk, tied exit and tied final
  // head) are summed.
  const ParamStore& wp = one[0]->params();
  for (int i = 0; i < static_cast<int>(wp.params().size()); ++i) {
    const ParamInfo& p = wp.params()[i];
    std::vector<double> sum(p.numel, 0.0);
    int holders = 0;
    for (Model* m : parts) {
      const int j = m->params().Find(p.name);
      if (j < 0) continue;
      ++holders;
      const float* g = m->params().grad(j);
      for (size_t e = 0; e < p.numel; ++e) sum[e] += g[e];
    }
    ASSERT_GT(holders, 0) << p.name;
    const float* g = wp.grad(i);
    double max_diff = 0, max_abs = 0;
    for (size_t e = 0; e < p.numel; ++e) {
      max_diff = std::max(max_diff, std::fabs(sum[e] - g[e]));
      max_abs = std::max(max_abs, std::fabs(static_cast<double>(g[e])));
    }
    EXPECT_LE(max_diff, 1e-5 * max_abs + 1e-7) << p.name;
  }

  const LossReport got_eval = exec.Evaluate(in.ids.data(), in.targets.data());
  EXPECT_NEAR(got_eval.final_loss, want_eval.final_loss, 1e-5 * want_eval.final_loss);
  for (size_t i = 0; i < want_eval.exit_losses.size(); ++i) {
    EXPECT_NEAR(got_eval.exit_losses[i], want_eval.exit_losses[i], 1e-5 * want_eval.exit_losses[i]);
  }
  EXPECT_LE(exec.peak_in_flight(), MaxInFlight(exec.schedule(), 0));
}

// EE-Tuning (frozen backbone) through model chunks: each record's exit work comes right after
// its activations are sent (or after its forward on the last virtual stage), and the losses and
// the exits' gradients equal the whole model's frozen step; the backbone gets no gradient.
TEST(InterleavedExecutor, FrozenBackboneSendsBeforeExitWorkAndMatchesWholeModel) {
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const int chunks = 2;
  const StepInputs in = Inputs(c, 4, 3);
  const std::vector<float> w = {0.5f, 0.3f};
  std::vector<Model*> one;
  auto whole = MakeChunks(c, be.get(), 1, 9, &one);
  ASSERT_EQ(one.size(), 1u);
  PipelineExecutor ref = in.Executor({one[0]}, ctx.get(), true);
  ref.set_frozen_backbone(true, /*stop_at_deepest_exit=*/false);  // the final head's loss too
  const LossReport want = ref.TrainStep(in.ids.data(), in.targets.data(), w);

  std::vector<Model*> parts;
  auto models = MakeChunks(c, be.get(), chunks, 9, &parts);
  ASSERT_EQ(parts.size(), static_cast<size_t>(chunks));
  PipelineExecutor exec = in.Executor(parts, ctx.get(), true);
  exec.set_frozen_backbone(true, /*stop_at_deepest_exit=*/false);
  const std::vector<Action>& list = exec.step_schedule().per_stage[0];
  int exit_actions = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    EXPECT_NE(list[i].type, ActionType::kBackward);
    if (list[i].type != ActionType::kExitHeads) continue;
    ++exit_actions;
    ASSERT_GT(i, 0u);
    const ActionType before =
        list[i].chunk == chunks - 1 ? ActionType::kForward : ActionType::kSendForward;
    EXPECT_EQ(list[i - 1], (Action{before, list[i].microbatch, list[i].chunk}))
        << ScheduleString(exec.step_schedule());
  }
  EXPECT_EQ(exit_actions, in.microbatches * chunks);
  const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
  EXPECT_NEAR(got.final_loss, want.final_loss, 1e-5 * want.final_loss);
  for (size_t i = 0; i < want.exit_losses.size(); ++i) {
    EXPECT_NEAR(got.exit_losses[i], want.exit_losses[i], 1e-5 * want.exit_losses[i]);
  }
  const ParamStore& wp = one[0]->params();
  for (Model* m : parts) {
    for (int j = 0; j < static_cast<int>(m->params().params().size()); ++j) {
      const ParamInfo& p = m->params().params()[j];
      const float* g = m->params().grad(j);
      const float* want_g = wp.grad(wp.Find(p.name));
      const bool exit_param = Model::IsExitTensor(p.name);
      double max_diff = 0, max_abs = 0, max_got = 0;
      for (size_t e = 0; e < p.numel; ++e) {
        max_diff = std::max(max_diff, std::fabs(static_cast<double>(g[e]) - want_g[e]));
        max_abs = std::max(max_abs, std::fabs(static_cast<double>(want_g[e])));
        max_got = std::max(max_got, std::fabs(static_cast<double>(g[e])));
      }
      if (exit_param) {
        EXPECT_GT(max_abs, 0.0) << p.name;
        EXPECT_LE(max_diff, 1e-5 * max_abs + 1e-7) << p.name;
      } else if (j != m->word_embedding()) {
        EXPECT_EQ(max_got, 0.0) << p.name << ": the backbone got a gradient";
        EXPECT_EQ(max_abs, 0.0) << p.name << ": the backbone got a gradient (whole model)";
      }
    }
  }
}

// EE-Tuning stops at the deepest exit: with one exit after layer 1 of 4, the step runs layer 1
// alone (the second of two chunks has no action, and the first sends nothing), computes no
// final head, and gives the exits exactly the losses and gradients of the step that runs every
// layer; the whole model (one chunk) likewise.
TEST(Executor, EeTuningStopsAtTheDeepestExit) {
  ModelConfig c = ConfigWithExits();
  c.exits.resize(1);  // the norm exit after layer 1, tied to the word embedding
  c.exits[0].tied = false;
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const StepInputs in = Inputs(c, 2, 5);
  const std::vector<float> w = {0.5f};
  for (int chunks : {1, 2}) {
    SCOPED_TRACE(::testing::Message() << chunks << " chunk(s)");
    std::vector<Model*> full_parts, parts;
    auto full_models = MakeChunks(c, be.get(), chunks, 11, &full_parts);
    auto models = MakeChunks(c, be.get(), chunks, 11, &parts);
    ASSERT_EQ(parts.size(), static_cast<size_t>(chunks));
    PipelineExecutor full = in.Executor(full_parts, ctx.get(), true);
    full.set_frozen_backbone(true, /*stop_at_deepest_exit=*/false);
    PipelineExecutor exec = in.Executor(parts, ctx.get(), true);
    exec.set_frozen_backbone(true);
    EXPECT_TRUE(full.tune_computes_final_loss());
    EXPECT_FALSE(exec.tune_computes_final_loss());
    for (const Action& a : exec.step_schedule().per_stage[0]) {
      EXPECT_EQ(a.chunk, 0) << ScheduleString(exec.step_schedule());
      EXPECT_NE(a.type, ActionType::kSendForward) << ScheduleString(exec.step_schedule());
    }
    const LossReport want = full.TrainStep(in.ids.data(), in.targets.data(), w);
    const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
    EXPECT_GT(want.final_loss, 0.0);
    EXPECT_EQ(got.final_loss, 0.0);
    EXPECT_GT(want.exit_losses[0], 0.0);
    EXPECT_EQ(got.exit_losses[0], want.exit_losses[0]);
    EXPECT_EQ(got.objective, want.objective);
    for (int k = 0; k < chunks; ++k) {
      const ParamStore &a = parts[k]->params(), &b = full_parts[k]->params();
      for (int j = 0; j < static_cast<int>(a.params().size()); ++j) {
        const ParamInfo& p = a.params()[j];
        EXPECT_EQ(std::memcmp(a.grad(j), b.grad(j), p.numel * sizeof(float)), 0) << p.name;
      }
    }
    // Validation still runs every layer and the final head.
    EXPECT_GT(exec.Evaluate(in.ids.data(), in.targets.data()).final_loss, 0.0);
  }
}

// A model cut after its deepest exit (StageSpec::depth; a "pre" exit of layer 3 reads depth 2)
// holds layers 1-2 alone, no final head, and that exit on its last chunk; its exits get the
// losses and gradients of the whole model's tuning step, and their validation losses.
TEST(Executor, ModelCutAtTheDeepestExitTunesAsTheWholeModel) {
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const StepInputs in = Inputs(c, 2, 5);
  const std::vector<float> w = {0.5f, 0.3f};
  std::vector<Model*> whole_parts;
  auto whole_models = MakeChunks(c, be.get(), 1, 11, &whole_parts);
  ASSERT_EQ(whole_parts.size(), 1u);
  PipelineExecutor whole = in.Executor(whole_parts, ctx.get(), true);
  whole.set_frozen_backbone(true);
  const LossReport want = whole.TrainStep(in.ids.data(), in.targets.data(), w);
  const LossReport want_eval = whole.Evaluate(in.ids.data(), in.targets.data());
  EXPECT_EQ(Model::Create(c, be.get(), StageSpec{0, 1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);  // above the deepest exit
  for (int chunks : {1, 2}) {
    SCOPED_TRACE(::testing::Message() << chunks << " chunk(s)");
    std::vector<Model*> parts;
    auto models = MakeChunks(c, be.get(), chunks, 11, &parts, /*depth=*/2);
    ASSERT_EQ(parts.size(), static_cast<size_t>(chunks));
    const Model& last = *parts.back();
    EXPECT_TRUE(last.is_last_stage());
    EXPECT_FALSE(last.has_final_head());
    EXPECT_EQ(last.end_layer(), 2);
    EXPECT_TRUE(last.ExitIsLocal(1));
    EXPECT_EQ(parts[0]->ExitIsLocal(1), chunks == 1);
    for (Model* m : parts) {
      for (const ParamInfo& p : m->params().params()) {
        EXPECT_TRUE(p.name.rfind("layers.2.", 0) != 0 && p.name.rfind("layers.3.", 0) != 0 &&
                    p.name.rfind("final_norm", 0) != 0)
            << p.name << " is past the cut";
      }
    }
    PipelineExecutor exec = in.Executor(parts, ctx.get(), true);
    exec.set_frozen_backbone(true);
    const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
    EXPECT_EQ(got.exit_losses, want.exit_losses);
    EXPECT_EQ(got.objective, want.objective);
    int compared = 0;
    for (Model* m : parts) {
      const ParamStore& a = m->params();
      const ParamStore& b = whole_parts[0]->params();
      for (int j = 0; j < static_cast<int>(a.params().size()); ++j) {
        const ParamInfo& p = a.params()[j];
        if (!Model::IsExitTensor(p.name)) continue;
        const int k = b.Find(p.name);
        ASSERT_GE(k, 0) << p.name;
        EXPECT_EQ(std::memcmp(a.grad(j), b.grad(k), p.numel * sizeof(float)), 0) << p.name;
        ++compared;
      }
    }
    EXPECT_GE(compared, 6);  // exit 0's norm; exit 1's norm, MLP and head
    const LossReport eval = exec.Evaluate(in.ids.data(), in.targets.data());
    EXPECT_EQ(eval.final_loss, 0.0);
    EXPECT_EQ(eval.exit_losses, want_eval.exit_losses);
  }
}

INSTANTIATE_TEST_SUITE_P(Chunks, InterleavedExecutor,
                         ::testing::Combine(::testing::Values(2, 4), ::testing::Bool()));

// Megatron's --eod-mask-loss (set_eod_loss_mask): through two model chunks, with exit work in
// the bubbles, a step's losses and gradients are those of the whole model given the mask
// "input id != eod" explicitly, microbatch by microbatch; one microbatch is all end-of-text
// (nothing to learn from it: no loss, no gradient). Without the mask they differ.
TEST(Executor, EodLossMaskMatchesAnExplicitMask) {
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  StepInputs in = Inputs(c, 4, 21);
  const int eod = 5, rows = StepInputs::kMicro * StepInputs::kSeq;
  for (int k : {1, 4, 6, 11, 20}) in.ids[k] = eod;
  for (int k = 2 * rows; k < 3 * rows; ++k) in.ids[k] = eod;  // microbatch 2: end-of-text alone
  const std::vector<float> w = {0.5f, 0.3f};

  std::vector<Model*> one;
  auto whole = MakeChunks(c, be.get(), 1, 9, &one);
  ASSERT_EQ(one.size(), 1u);
  auto ws = one[0]->MakeWorkspace(StepInputs::kMicro, StepInputs::kSeq);
  LossReport want;
  double want_eval_final = 0;
  want.exit_losses.assign(c.exits.size(), 0.0);
  for (int m = 0; m < in.microbatches; ++m) {
    std::vector<float> mask(rows);
    for (int k = 0; k < rows; ++k) mask[k] = in.ids[m * rows + k] == eod ? 0.0f : 1.0f;
    const LossReport r =
        one[0]->ForwardBackward(*ws, in.ids.data() + m * rows, in.targets.data() + m * rows,
                                mask.data(), w, true, 1.0f / in.microbatches);
    want.final_loss += r.final_loss / in.microbatches;
    for (size_t i = 0; i < c.exits.size(); ++i) {
      want.exit_losses[i] += r.exit_losses[i] / in.microbatches;
    }
    want.tokens += r.tokens;
    want_eval_final += one[0]
                           ->ForwardBackward(*ws, in.ids.data() + m * rows,
                                             in.targets.data() + m * rows, mask.data(), w, false)
                           .final_loss /
                       in.microbatches;
  }
  EXPECT_EQ(want.tokens, 4 * rows - rows - 5);

  for (bool masked : {true, false}) {
    std::vector<Model*> parts;
    auto models = MakeChunks(c, be.get(), 2, 9, &parts);
    ASSERT_EQ(parts.size(), 2u);
    PipelineExecutor exec = in.Executor(parts, ctx.get(), /*place=*/true);
    if (masked) exec.set_eod_loss_mask(eod);
    const LossReport got = exec.TrainStep(in.ids.data(), in.targets.data(), w);
    const bool same = std::fabs(got.final_loss - want.final_loss) <= 1e-5 * want.final_loss;
    EXPECT_EQ(same, masked) << got.final_loss << " vs " << want.final_loss;
    if (!masked) continue;
    for (size_t i = 0; i < c.exits.size(); ++i) {
      EXPECT_NEAR(got.exit_losses[i], want.exit_losses[i], 1e-5 * want.exit_losses[i]);
    }
    // Gradients by tensor name; the word embedding's copies in the two chunks summed.
    const ParamStore& wp = one[0]->params();
    for (int i = 0; i < static_cast<int>(wp.params().size()); ++i) {
      const ParamInfo& p = wp.params()[i];
      std::vector<double> sum(p.numel, 0.0);
      for (Model* m : parts) {
        const int j = m->params().Find(p.name);
        if (j < 0) continue;
        for (size_t e = 0; e < p.numel; ++e) sum[e] += m->params().grad(j)[e];
      }
      double max_diff = 0, max_abs = 0;
      for (size_t e = 0; e < p.numel; ++e) {
        max_diff = std::max(max_diff, std::fabs(sum[e] - wp.grad(i)[e]));
        max_abs = std::max(max_abs, std::fabs(static_cast<double>(wp.grad(i)[e])));
      }
      EXPECT_GT(max_abs, 0.0) << p.name;
      EXPECT_LE(max_diff, 1e-5 * max_abs + 1e-7) << p.name;
    }
    const LossReport eval = exec.Evaluate(in.ids.data(), in.targets.data());
    EXPECT_NEAR(eval.final_loss, want_eval_final, 1e-5 * want_eval_final);
  }
}

// EE-Tuning's hidden-state cache: the first step stores what the exits and the final head read;
// a second step with the same windows runs no forward (only exit work) and computes exactly the
// first one's losses and gradients; a third with the same windows but other ids still does,
// since the rows come from the cache, not from the ids. Whole model and two chunks.
TEST(Executor, TuneCacheStepRunsNoForwardAndReadsTheStoredRows) {
  const ModelConfig c = ConfigWithExits();
  auto be = Cpu();
  auto ctx = ParallelContext::Single();
  const StepInputs in = Inputs(c, 2, 5);
  const StepInputs other = Inputs(c, 2, 7);
  const std::vector<float> w = {0.5f, 0.3f};
  for (int chunks : {1, 2}) {
    SCOPED_TRACE(::testing::Message() << chunks << " chunk(s)");
    std::vector<Model*> parts;
    auto models = MakeChunks(c, be.get(), chunks, 11, &parts);
    ASSERT_EQ(parts.size(), static_cast<size_t>(chunks));
    PipelineExecutor exec = in.Executor(parts, ctx.get(), true);
    exec.set_frozen_backbone(true, /*stop_at_deepest_exit=*/false);  // the final head's loss too
    ASSERT_TRUE(exec.tune_computes_final_loss());
    exec.set_tune_cache(8);
    exec.set_step_windows({10, 11});
    auto grads = [&] {
      std::vector<float> g;
      for (Model* m : parts) {
        const ParamStore& ps = m->params();
        g.insert(g.end(), ps.grads_data(), ps.grads_data() + ps.grad_size());
      }
      return g;
    };
    auto forwards = [&] {
      int n = 0;
      for (const BusyInterval& i : exec.last_step_intervals())
        n += i.action.type == ActionType::kForward;
      return n;
    };
    const LossReport first = exec.TrainStep(in.ids.data(), in.targets.data(), w);
    EXPECT_EQ(exec.cached_steps(), 0);
    EXPECT_EQ(forwards(), in.microbatches * chunks);
    EXPECT_GT(first.final_loss, 0.0);
    const std::vector<float> first_grads = grads();
    for (const StepInputs* ids : {&in, &other}) {
      for (Model* m : parts) m->params().ZeroGrads();
      const LossReport again = exec.TrainStep(ids->ids.data(), in.targets.data(), w);
      EXPECT_EQ(forwards(), 0);
      EXPECT_NE(exec.step_schedule().name.find("from the tune cache"), std::string::npos);
      EXPECT_EQ(again.final_loss, first.final_loss);
      EXPECT_EQ(again.exit_losses, first.exit_losses);
      EXPECT_EQ(again.objective, first.objective);
      EXPECT_TRUE(grads() == first_grads);
    }
    EXPECT_EQ(exec.cached_steps(), 2);
    // A new window: the step runs the backbone again, on the other ids.
    exec.set_step_windows({10, 12});
    for (Model* m : parts) m->params().ZeroGrads();
    const LossReport fresh = exec.TrainStep(other.ids.data(), in.targets.data(), w);
    EXPECT_EQ(forwards(), in.microbatches * chunks);
    EXPECT_NE(fresh.final_loss, first.final_loss);
  }
}

}  // namespace
}  // namespace eellm
