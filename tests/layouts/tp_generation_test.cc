// Generation and serving under tensor parallelism, under mpirun: the world is one
// tensor-parallel group. Rank 0 saves a single-rank model; every rank loads its shard of that
// checkpoint.
// - TpGeneration: every rank generates a batch of four sequences with early exit (mixed prompt
//   lengths, thresholds, allowed exits and sampling) and gets the single-rank model's tokens,
//   exits and depths: the heads' vocabulary shards are gathered, so the ranks agree; tensor
//   parallelism only reorders fp32 sums, so log-probabilities agree within 1e-4.
// - TpServing: rank 0 leads a GenerationService, the others Follow; its answers equal a
//   single-process service's, with stop rules, slot reuse and concurrent clients, on the CPU and
//   on the CUDA backend's code (emulated; the model's communicator stages device memory, the
//   service's messages use a host one).
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
#include "parallel/comm/mpi_communicator.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/layouts/generation_fixture.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

// Exits (after layers 1, 2 and 3): a tied norm exit, a block exit (its own attention heads split
// over the ranks, its own KV cache) and an MLP exit.
ModelConfig TpGenerationConfig(ModelStyle style) {
  ModelConfig c;
  c.style = style;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.num_heads = 8;
  c.num_kv_heads = style == ModelStyle::kLlama ? 2 : 8;
  c.ffn_hidden_size = 48;
  c.max_seq_len = 32;
  c.tie_embeddings = style == ModelStyle::kGpt;
  ExitConfig a, b, d;
  a.layer = 1;
  a.kind = ExitKind::kNorm;
  a.tied = true;
  b.layer = 2;
  b.kind = ExitKind::kBlock;
  d.layer = 3;
  d.kind = ExitKind::kMlp;
  c.exits = {a, b, d};
  return c;
}

class TpGeneration : public ::testing::TestWithParam<ModelStyle> {};

TEST_P(TpGeneration, EveryRankGeneratesWhatTheWholeModelGenerates) {
  auto world = MpiCommunicator::World(nullptr);
  const int tp = world->size(), rank = world->rank();
  const ModelConfig c = TpGenerationConfig(GetParam());
  if (!SplitsOverTp(c, tp)) GTEST_SKIP() << "the test model does not split over " << tp;
  auto be = std::move(*MakeBackend("cpu"));
  auto whole = *Model::Create(c, be.get());
  testing::FillParams(*whole, 17, 0.5f);  // what the saved file holds
  const std::string file = testing::SaveFilledModel(
      world.get(), c, GetParam() == ModelStyle::kGpt ? "tp_gpt" : "tp_llama");
  auto part = LoadModelFromCheckpoint(file, be.get(), false, TpSpec{rank, tp, world.get()});
  world->Barrier();
  if (rank == 0) std::remove(file.c_str());
  ASSERT_TRUE(part.ok()) << part.status();
  const std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  Generator gw(whole.get(), 32, 4), gp(part->model.get(), 32, 4);
  auto want = *gw.GenerateBatch(reqs);
  auto got = *gp.GenerateBatch(reqs);
  int early = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank << " of " << tp << ", sequence " << i);
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].exit_index, want[i].exit_index);
    EXPECT_EQ(got[i].depth, want[i].depth);
    ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size());
    for (size_t t = 0; t < got[i].logprobs.size(); ++t) {
      EXPECT_NEAR(got[i].logprobs[t], want[i].logprobs[t], 1e-4) << "token " << t;
    }
    for (int e : want[i].exit_index) early += e >= 0;
  }
  EXPECT_GT(early, 5) << "too few early exits to test the exit heads under tensor parallelism";

  // Self-speculative decoding, greedy and sampled, from each exit (the block exit's own K/V
  // split over the ranks): every rank drafts, keeps and emits what the whole model does.
  std::vector<GenerationRequest> spec = reqs;
  const int drafts[] = {1, 3, 5, kMaxDraftTokens};
  for (size_t i = 0; i < spec.size(); ++i) {
    spec[i].early_exit = EarlyExitParams();
    spec[i].speculative = {c.exits[i % c.exits.size()].layer, drafts[i]};
  }
  want = *gw.GenerateBatch(spec);
  got = *gp.GenerateBatch(spec);
  int drafted = 0, kept = 0;
  for (size_t i = 0; i < spec.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank << " of " << tp << ", speculative " << i);
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].drafted, want[i].drafted);
    EXPECT_EQ(got[i].accepted, want[i].accepted);
    ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size());
    for (size_t t = 0; t < got[i].logprobs.size(); ++t) {
      EXPECT_NEAR(got[i].logprobs[t], want[i].logprobs[t], 1e-4) << "token " << t;
    }
    drafted += want[i].drafted;
    kept += want[i].accepted;
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, drafted);
}

INSTANTIATE_TEST_SUITE_P(Styles, TpGeneration,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

// Stop rules only the leader evaluates: one on the token where the length also ends the
// sequence, one after 3 tokens, one on the first token. The first is decoded speculatively and
// the last scores its prompt: the followers must mirror both (their passes differ).
std::vector<GenerationRequest> RequestsWithStops(const ModelConfig& c) {
  std::vector<GenerationRequest> r = testing::MixedRequests(c);
  r[0].speculative = {2, 3, 0.2f};
  r[3].prompt_logprobs = true;
  r[3].top_logprobs = 2;
  r[0].stop = [n = r[0].max_new_tokens](const std::vector<int32_t>& t) {
    return static_cast<int>(t.size()) == n;
  };
  r[1].stop = [](const std::vector<int32_t>& t) { return t.size() == 3; };
  r[2].stop = [](const std::vector<int32_t>& t) { return t.size() == 1; };
  return r;
}

void ExpectSameResults(const std::vector<GenerationResult>& got,
                       const std::vector<GenerationResult>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].tokens, want[i].tokens) << what << ", sequence " << i;
    EXPECT_EQ(got[i].exit_index, want[i].exit_index) << what << ", sequence " << i;
    EXPECT_EQ(got[i].finish, want[i].finish) << what << ", sequence " << i;
    EXPECT_EQ(got[i].drafted, want[i].drafted) << what << ", sequence " << i;
    EXPECT_EQ(got[i].accepted, want[i].accepted) << what << ", sequence " << i;
    ASSERT_EQ(got[i].prompt_logprobs.size(), want[i].prompt_logprobs.size()) << what;
    for (size_t p = 0; p < got[i].prompt_logprobs.size(); ++p) {
      EXPECT_NEAR(got[i].prompt_logprobs[p], want[i].prompt_logprobs[p], 1e-4) << what;
    }
  }
}

class TpServing : public ::testing::TestWithParam<std::string> {};

// Two slots for four sequences per request: admissions and retirements of the same slot share
// messages; two clients at once, one more request, a cancelled one, and one after it.
TEST_P(TpServing, FollowersMirrorTheLeader) {
  auto messages = MpiCommunicator::World(nullptr);
  const int tp = messages->size(), rank = messages->rank();
  const ModelConfig c = TpGenerationConfig(ModelStyle::kLlama);
  if (!SplitsOverTp(c, tp)) GTEST_SKIP() << "the test model does not split over " << tp;
  auto be = std::move(*MakeBackendOrEmulated(GetParam()));
  auto world = MpiCommunicator::World(be.get());
  const std::string file = testing::SaveFilledModel(messages.get(), c, "tp_serving_" + GetParam());
  auto whole = LoadModelFromCheckpoint(file, be.get());
  auto part = LoadModelFromCheckpoint(file, be.get(), false, TpSpec{rank, tp, world.get()});
  messages->Barrier();
  if (rank == 0) std::remove(file.c_str());
  ASSERT_TRUE(whole.ok() && part.ok()) << part.status();
  const std::vector<GenerationRequest> reqs = RequestsWithStops(c);
  std::vector<GenerationResult> want;
  {
    Generator g(whole->model.get(), 32, 2);
    GenerationService alone(&g);
    want = *alone.Generate(reqs);
  }
  int stopped = 0;
  for (const GenerationResult& g : want) stopped += g.finish == FinishReason::kStop;
  EXPECT_EQ(stopped, 3);
  EXPECT_GT(want[0].drafted, 0);
  EXPECT_EQ(want[3].prompt_logprobs.size(), reqs[3].prompt.size() - 1);
  // A conversation: the second turn's prompt is the first's, its answer and 2 more tokens; it
  // holds the first turn's cached page (16 of its 30 tokens).
  std::vector<GenerationRequest> turns(2);
  turns[0].prompt = testing::RandomTokens(20, c.vocab_size, 17);
  turns[0].max_new_tokens = 8;
  std::vector<GenerationResult> want_turn;
  {
    Generator g(whole->model.get(), 32, 2);
    want_turn.push_back(g.GenerateBatch({turns[0]})->at(0));
    turns[1].prompt = turns[0].prompt;
    turns[1].prompt.insert(turns[1].prompt.end(), want_turn[0].tokens.begin(),
                           want_turn[0].tokens.end());
    turns[1].prompt.insert(turns[1].prompt.end(), {3, 5});
    turns[1].max_new_tokens = 2;
    turns[1].sampling.temperature = 0.9f;
    turns[1].sampling.seed = 4;
    want_turn.push_back(g.GenerateBatch({turns[1]})->at(0));
  }
  // One KV cache of 60 tokens for both slots (needs of 20-31 tokens: a range may not fit until
  // the other sequence ends), with prefix caching and prefill chunks of 8 tokens; the followers
  // take the same pages and chunks as the leader.
  Generator gp(part->model.get(), 32, 2, /*kv_tokens=*/60);
  gp.EnablePrefixCaching();
  gp.SetPrefillChunk(8);
  if (rank != 0) {
    GenerationService::Follow(&gp, messages.get());
    EXPECT_EQ(gp.prefix_cached_tokens(), 16);
    return;
  }
  GenerationService leader(&gp, messages.get(), /*own_thread=*/false);
  std::vector<std::vector<GenerationResult>> got(7);
  int cancelled_count = 0;
  std::thread clients([&] {
    got[0] = *leader.Generate(reqs);
    std::thread other([&] { got[1] = *leader.Generate(reqs); });
    got[2] = *leader.Generate(reqs);
    other.join();
    got[3] = *leader.Generate({reqs[2], reqs[0]});
    // Cancelled after its third token: two sequences running (the followers retire them too),
    // two still queued. The next request then runs as before.
    std::atomic<bool> cancel{false};
    std::atomic<int> tokens{0};
    auto cancelled = *leader.Generate(
        reqs, [&](int, int32_t) { cancel = ++tokens >= 3; }, &cancel);
    for (const GenerationResult& g : cancelled)
      cancelled_count += g.finish == FinishReason::kCancelled;
    got[4] = *leader.Generate(reqs);
    got[5] = *leader.Generate({turns[0]});
    got[6] = *leader.Generate({turns[1]});
    leader.Shutdown();
  });
  leader.Run();
  clients.join();
  ExpectSameResults(got[0], want, "first request");
  ExpectSameResults(got[1], want, "concurrent request a");
  ExpectSameResults(got[2], want, "concurrent request b");
  ExpectSameResults(got[3], {want[2], want[0]}, "request after them");
  EXPECT_GE(cancelled_count, 3);
  ExpectSameResults(got[5], {want_turn[0]}, "a conversation's first turn");
  ExpectSameResults(got[6], {want_turn[1]}, "its second turn");
  EXPECT_EQ(got[6][0].cached_prompt_tokens, 16);
  EXPECT_EQ(gp.prefix_cached_tokens(), 16);
  ExpectSameResults(got[4], want, "request after the cancelled one");
}

INSTANTIATE_TEST_SUITE_P(Backends, TpServing, ::testing::Values("cpu", "emulated-cuda"));

}  // namespace
}  // namespace eellm
