// Pipeline-parallel generation (PipelineGenerator) under mpirun: every (pp, tp) layout of the
// world whose stages split the model's 4 layers. Rank 0 saves a single-rank model; every rank
// loads its stage's tensor-parallel shard and runs its part of a batch of four sequences with
// early exit (mixed prompt lengths, thresholds, allowed exits and sampling; the prompts overflow
// one pass). The leader gets the single-rank Generator's tokens, exits and depths, whose deep
// K/V come from recomputation where the pipeline's come from the deeper stages finishing every
// token: the same values, so log-probabilities agree within 1e-4 (tensor parallelism reorders
// fp32 sums). Exits sit on different stages, at stage boundaries (pre-exits read a stage's
// input), and include a block exit with its own KV cache.
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "launch/generation_service.h"
#include "launch/model_loader.h"
#include "models/generator.h"
#include "models/pipeline_generator.h"
#include "parallel/comm/mpi_communicator.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/layouts/generation_fixture.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

struct PpCase {
  const char* name;
  ModelStyle style;
  bool pre_exits;  // exits before layers 2, 3 and 4 instead of after layers 1, 2 and 3
  const char* backend;
};

ModelConfig PpGenerationConfig(const PpCase& p) {
  ModelConfig c;
  c.style = p.style;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.num_heads = 8;
  c.num_kv_heads = p.style == ModelStyle::kLlama ? 2 : 8;
  c.ffn_hidden_size = 48;
  c.max_seq_len = 32;
  c.tie_embeddings = p.style == ModelStyle::kGpt;
  ExitConfig a, b, d;
  a.kind = ExitKind::kNorm;
  a.tied = true;  // on a later stage, a copy of the word embedding
  b.kind = ExitKind::kBlock;
  d.kind = ExitKind::kMlp;
  a.layer = 1;
  b.layer = 2;
  d.layer = 3;
  if (p.pre_exits) {
    for (ExitConfig* x : {&a, &b, &d}) {
      x->layer += 1;
      x->position = ExitPosition::kPre;
    }
  }
  c.exits = {a, b, d};
  return c;
}

class PpGeneration : public ::testing::TestWithParam<PpCase> {};

TEST_P(PpGeneration, EveryLayoutGeneratesWhatTheWholeModelGenerates) {
  auto messages = MpiCommunicator::World(nullptr);
  const int world = messages->size(), rank = messages->rank();
  const ModelConfig c = PpGenerationConfig(GetParam());
  ASSERT_TRUE(ParseModelConfig(c.ToJson()).ok()) << ParseModelConfig(c.ToJson()).status();
  auto be = std::move(*MakeBackendOrEmulated(GetParam().backend));
  auto device_world = MpiCommunicator::World(be.get());
  const std::string file =
      testing::SaveFilledModel(messages.get(), c, std::string("pp_") + GetParam().name);
  std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  reqs[3].early_exit.exit_layers = {c.exits[0].layer, c.exits[2].layer};
  reqs[1].prompt_logprobs = true;  // the last stage scores the prompt and decides its first token
  reqs[1].top_logprobs = 3;
  GenerationRequest score_only = reqs[0];  // max_new_tokens 0: the last stage scores, no token
  score_only.prompt_logprobs = true;
  score_only.max_new_tokens = 0;
  GenerationRequest alone = reqs[2];  // one 27-token prompt: 6 chunks of at most 5
  alone.max_new_tokens = 3;
  alone.prompt.resize(27);
  for (size_t i = 0; i < alone.prompt.size(); ++i) {
    alone.prompt[i] = static_cast<int32_t>((7 * i + 3) % c.vocab_size);
  }
  std::vector<GenerationResult> want, want_score, want_alone;
  if (rank == 0) {
    auto whole = LoadModelFromCheckpoint(file, be.get());
    ASSERT_TRUE(whole.ok()) << whole.status();
    Generator g(whole->model.get(), 32, 4);
    want = *g.GenerateBatch(reqs);
    want_score = *g.GenerateBatch({score_only});
    want_alone = *g.GenerateBatch({alone});
  }
  int layouts = 0;
  for (int pp = 1; pp <= world; ++pp) {
    const int tp = world / pp;
    if (world % pp != 0 || c.num_layers % pp != 0 || !SplitsOverTp(c, tp)) continue;
    ++layouts;
    auto part = testing::LoadStageShard(file, be.get(), device_world.get(), pp, tp);
    ASSERT_TRUE(part.ok()) << part.status();
    const int stage = part->stage;
    Generator stage_gen(part->loaded.model.get(), 32, 4);
    stage_gen.SetPrefillChunk(5);  // prompts of 3-14 tokens, scored ones too, in chunks
    PipelineGenerator pipeline(&stage_gen, messages.get(), pp, tp);
    std::vector<int> streamed(reqs.size());
    auto got = pipeline.GenerateBatch(reqs, [&](int i, int32_t) { ++streamed[i]; });
    ASSERT_TRUE(got.ok()) << got.status();
    // Every stage ran every token through its layers.
    int64_t tokens = 0;
    for (const GenerationRequest& r : reqs) tokens += r.prompt.size() + r.max_new_tokens - 1;
    if (pipeline.leader()) {
      ASSERT_EQ(got->size(), reqs.size());
      int early = 0, later_stage = 0;
      for (size_t i = 0; i < reqs.size(); ++i) {
        SCOPED_TRACE(::testing::Message() << "pp " << pp << " x tp " << tp << ", sequence " << i);
        const GenerationResult &g = (*got)[i], &w = want[i];
        EXPECT_EQ(g.tokens, w.tokens);
        EXPECT_EQ(g.exit_index, w.exit_index);
        EXPECT_EQ(g.depth, w.depth);
        EXPECT_EQ(g.finish, w.finish);
        EXPECT_EQ(streamed[i], static_cast<int>(g.tokens.size()));
        ASSERT_EQ(g.logprobs.size(), w.logprobs.size());
        for (size_t t = 0; t < g.logprobs.size(); ++t) {
          EXPECT_NEAR(g.logprobs[t], w.logprobs[t], 1e-4) << "token " << t;
        }
        ASSERT_EQ(g.prompt_logprobs.size(), w.prompt_logprobs.size());
        ASSERT_EQ(g.prompt_top.size(), w.prompt_top.size());
        for (size_t p = 0; p < g.prompt_logprobs.size(); ++p) {
          EXPECT_NEAR(g.prompt_logprobs[p], w.prompt_logprobs[p], 1e-4) << "prompt token " << p;
          ASSERT_EQ(g.prompt_top[p].size(), 3u);
          for (int j = 0; j < 3; ++j) {
            EXPECT_EQ(g.prompt_top[p][j].first, w.prompt_top[p][j].first) << "position " << p;
            EXPECT_NEAR(g.prompt_top[p][j].second, w.prompt_top[p][j].second, 1e-4);
          }
        }
        for (size_t t = 0; t < w.exit_index.size(); ++t) {
          early += w.exit_index[t] >= 0;
          later_stage += w.depth[t] > c.num_layers / pp;
        }
      }
      EXPECT_GT(early, 5) << "too few early exits to test the exit heads on the stages";
      EXPECT_EQ(want[1].prompt_logprobs.size(), reqs[1].prompt.size() - 1);
      if (pp > 1) EXPECT_GT(later_stage, 5) << "too few tokens decided on later stages";
    } else {
      EXPECT_TRUE(got->empty());
    }
    // Each token ran once through each stage: the prompts and every token but the last.
    EXPECT_EQ(pipeline.stats().rows, tokens) << "rank " << rank << ", stage " << stage;
    auto scored = pipeline.GenerateBatch({score_only});
    ASSERT_TRUE(scored.ok()) << scored.status();
    if (pipeline.leader()) {
      const GenerationResult& s = scored->at(0);
      EXPECT_TRUE(s.tokens.empty());
      ASSERT_EQ(s.prompt_logprobs.size(), score_only.prompt.size() - 1) << "pp " << pp;
      for (size_t p = 0; p < s.prompt_logprobs.size(); ++p) {
        EXPECT_NEAR(s.prompt_logprobs[p], want_score[0].prompt_logprobs[p], 1e-4) << "pp " << pp;
      }
    }
    // A long prompt alone: its chunks follow one another into the pipeline without waiting for
    // the previous chunk's answer.
    auto long_prompt = pipeline.GenerateBatch({alone});
    ASSERT_TRUE(long_prompt.ok()) << long_prompt.status();
    if (pipeline.leader()) {
      EXPECT_EQ(long_prompt->at(0).tokens, want_alone[0].tokens) << "pp " << pp;
      EXPECT_EQ(long_prompt->at(0).depth, want_alone[0].depth) << "pp " << pp;
      if (pp > 1) EXPECT_GE(pipeline.stats().most_in_flight_of_one, 2) << "pp " << pp;
    }
    messages->Barrier();
  }
  EXPECT_GE(layouts, 1);
  messages->Barrier();
  if (rank == 0) std::remove(file.c_str());
}

// Serving on a pipeline: rank 0 runs a GenerationService over the PipelineGenerator's leader,
// the other ranks Work(). Two slots for four sequences per request (slots are reused while the
// previous sequence's last rows are still in deeper stages), stop rules the leader evaluates,
// two clients at once, and a request cancelled after its third token (a sequence retired while
// a deeper stage decides its token keeps its slot until the decision arrives); the answers equal
// a single-process service's. The deepest pipeline the world allows (tp 2 where pp alone would
// not divide the layers).
TEST(PpServing, TheLeaderServesWhatOneProcessServes) {
  auto messages = MpiCommunicator::World(nullptr);
  const int world = messages->size(), rank = messages->rank();
  const PpCase p{"serving", ModelStyle::kLlama, false, "cpu"};
  const ModelConfig c = PpGenerationConfig(p);
  int pp = world;
  while (c.num_layers % pp != 0) pp /= 2;
  const int tp = world / pp;
  ASSERT_TRUE(SplitsOverTp(c, tp));
  auto be = std::move(*MakeBackend("cpu"));
  auto device_world = MpiCommunicator::World(be.get());
  const std::string file = testing::SaveFilledModel(messages.get(), c, "pp_serving");
  auto part = testing::LoadStageShard(file, be.get(), device_world.get(), pp, tp);
  messages->Barrier();  // every rank has read the file (the leader removes it)
  ASSERT_TRUE(part.ok()) << part.status();
  // One KV cache of 60 tokens for both slots (needs of 20-31 tokens: a range may not fit until
  // the other sequence ends), with prefix caching: the leader decides, and a sequence's first
  // pass tells every stage its pages and cached length.
  Generator stage_gen(part->loaded.model.get(), 32, 2, /*kv_tokens=*/60);
  stage_gen.EnablePrefixCaching();
  stage_gen.SetPrefillChunk(8);  // prompts of 9-30 tokens go in chunks
  PipelineGenerator pipeline(&stage_gen, messages.get(), pp, tp);
  if (!pipeline.leader()) {
    pipeline.Work();
    messages->Barrier();
    return;
  }
  std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  reqs[1].stop = [](const std::vector<int32_t>& t) { return t.size() == 3; };
  reqs[2].stop = [](const std::vector<int32_t>& t) { return t.size() == 1; };
  std::vector<GenerationResult> want;
  // A conversation: the second turn's prompt is the first's, its answer and 2 more tokens (30).
  // The first turn runs the full model, so the block exit on a deeper stage wrote no K/V for its
  // pages: the second (early exit) computes its own, which a third turn like it then holds.
  std::vector<GenerationRequest> turns(3);
  turns[0].prompt = testing::RandomTokens(20, c.vocab_size, 17);
  turns[0].max_new_tokens = 8;
  std::vector<GenerationResult> want_turn;
  {
    auto whole = LoadModelFromCheckpoint(file, be.get());
    ASSERT_TRUE(whole.ok()) << whole.status();
    Generator g(whole->model.get(), 32, 2);
    GenerationService alone(&g);
    want = *alone.Generate(reqs);
    want_turn.push_back(g.GenerateBatch({turns[0]})->at(0));
    turns[1] = turns[0];
    turns[1].prompt.insert(turns[1].prompt.end(), want_turn[0].tokens.begin(),
                           want_turn[0].tokens.end());
    turns[1].prompt.insert(turns[1].prompt.end(), {3, 5});
    turns[1].max_new_tokens = 2;
    turns[1].early_exit.threshold = 0.4f;
    want_turn.push_back(g.GenerateBatch({turns[1]})->at(0));
    turns[2] = turns[1];
    want_turn.push_back(want_turn[1]);
  }
  std::remove(file.c_str());
  GenerationService service(&pipeline, nullptr, /*own_thread=*/false);
  std::vector<std::vector<GenerationResult>> got(7);
  int cancelled_count = 0;
  std::thread clients([&] {
    got[0] = *service.Generate(reqs);
    std::thread other([&] { got[1] = *service.Generate(reqs); });
    got[2] = *service.Generate(reqs);
    other.join();
    std::atomic<bool> cancel{false};
    std::atomic<int> tokens{0};
    auto cancelled = *service.Generate(
        reqs, [&](int, int32_t) { cancel = ++tokens >= 3; }, &cancel);
    for (const GenerationResult& g : cancelled) {
      cancelled_count += g.finish == FinishReason::kCancelled;
    }
    got[3] = *service.Generate(reqs);
    got[4] = *service.Generate({turns[0]});
    got[5] = *service.Generate({turns[1]});
    got[6] = *service.Generate({turns[2]});
    service.Shutdown();
  });
  service.Run();
  pipeline.Stop();
  clients.join();
  messages->Barrier();
  const std::string names[] = {"first request", "concurrent request a", "concurrent request b",
                               "request after the cancelled one"};
  for (int k = 0; k < 4; ++k) {
    ASSERT_EQ(got[k].size(), want.size()) << names[k];
    for (size_t i = 0; i < want.size(); ++i) {
      SCOPED_TRACE(::testing::Message()
                   << names[k] << ", sequence " << i << ", pp " << pp << " x tp " << tp);
      EXPECT_EQ(got[k][i].tokens, want[i].tokens);
      EXPECT_EQ(got[k][i].exit_index, want[i].exit_index);
      EXPECT_EQ(got[k][i].finish, want[i].finish);
    }
  }
  EXPECT_GE(cancelled_count, 3);
  EXPECT_EQ(service.generator().free_slots(), 2) << "a slot was lost";
  for (int k = 0; k < 3; ++k) {
    ASSERT_EQ(got[4 + k].size(), 1u);
    EXPECT_EQ(got[4 + k][0].tokens, want_turn[k].tokens) << "turn " << k;
    EXPECT_EQ(got[4 + k][0].exit_index, want_turn[k].exit_index) << "turn " << k;
  }
  EXPECT_EQ(got[5][0].cached_prompt_tokens, 0);
  EXPECT_EQ(got[6][0].cached_prompt_tokens, 16);
  EXPECT_EQ(service.stats().prefix_cached_tokens, 16);
}

INSTANTIATE_TEST_SUITE_P(
    Models, PpGeneration,
    ::testing::Values(PpCase{"gpt", ModelStyle::kGpt, false, "cpu"},
                      PpCase{"llama", ModelStyle::kLlama, false, "cpu"},
                      PpCase{"llama_pre_exits", ModelStyle::kLlama, true, "cpu"},
                      PpCase{"llama_emulated_cuda", ModelStyle::kLlama, false, "emulated-cuda"}),
    [](const ::testing::TestParamInfo<PpCase>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace eellm
