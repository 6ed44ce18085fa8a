// KV-cache decoding and early-exit generation against full forward passes; batched generation
// against each sequence generated alone.
#include "models/generator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "tests/models/full_pass.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::ConfigWithExits;
using testing::Cpu;
using testing::ExpectCacheMatches;
using testing::ExpectMatchesFullPass;
using testing::FullPass;
using testing::MaxAbsDiff;
using testing::RunFull;
using testing::TinyConfig;

class GeneratorTest : public ::testing::TestWithParam<ModelStyle> {};

// A prefill of 6 of `ids` and one-token decode steps without early exit give the logits of a
// full forward pass at every position, and its K and V.
void ExpectDecodingMatchesFullPass(Model& m, const std::vector<int32_t>& ids) {
  const ModelConfig& c = m.config();
  const FullPass full = RunFull(m, ids);
  Generator g(&m, c.max_seq_len);
  EarlyExitParams off;
  StepResult r = g.Step({ids.begin(), ids.begin() + 6}, off);
  EXPECT_LT(MaxAbsDiff(r.logits.data(), full.final_logits[5].data(), c.vocab_size), 1e-4);
  for (size_t p = 6; p < ids.size(); ++p) {
    r = g.Step({ids[p]}, off);
    ASSERT_EQ(r.exit_index, -1);
    EXPECT_EQ(r.depth, c.num_layers);
    EXPECT_LT(MaxAbsDiff(r.logits.data(), full.final_logits[p].data(), c.vocab_size), 1e-4)
        << "position " << p;
  }
  ExpectCacheMatches(g, 0, full);
}

TEST_P(GeneratorTest, KvCacheDecodingMatchesFullForward) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 11);
  ExpectDecodingMatchesFullPass(*m, testing::RandomTokens(20, c.vocab_size, 12));
}

// Learned positions have max_seq_len rows: a token past them is refused before it is embedded
// (Embed reads the positions on the device unchecked). RoPE has no such table.
TEST_P(GeneratorTest, TokensBeyondLearnedPositionsAreRefused) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 41);
  Generator g(m.get(), c.max_seq_len + 4);
  const std::vector<int32_t> prompt = testing::RandomTokens(c.max_seq_len, c.vocab_size, 42);
  EXPECT_EQ(g.Step(prompt, EarlyExitParams{}).logits.size(), static_cast<size_t>(c.vocab_size));
  if (c.learned_positions()) {
    EXPECT_DEATH(g.Step({1}, EarlyExitParams{}), "past the model's max_seq_len");
  } else {
    EXPECT_EQ(g.Step({1}, EarlyExitParams{}).logits.size(), static_cast<size_t>(c.vocab_size));
  }
}

// With threshold 1.0 generation reproduces, token for token, the same backbone without exits.
TEST_P(GeneratorTest, ThresholdOneEqualsModelWithoutExits) {
  ModelConfig c = ConfigWithExits(GetParam());
  ModelConfig plain = c;
  plain.exits.clear();
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  auto p = *Model::Create(plain, be.get());
  testing::FillParams(*m, 21, 0.5f);
  testing::CopyParamsByName(*m, *p);
  auto prompt = testing::RandomTokens(5, c.vocab_size, 22);
  for (float temperature : {0.0f, 0.9f}) {
    SamplingParams sp;
    sp.temperature = temperature;
    sp.top_k = 8;
    sp.top_p = 0.9f;
    sp.seed = 7;
    EarlyExitParams ee;
    ee.threshold = 1.0f;
    Generator gm(m.get(), 32), gp(p.get(), 32);
    auto a = *gm.Generate(prompt, 25, -1, sp, ee);
    auto b = *gp.Generate(prompt, 25, -1, sp, ee);
    ASSERT_EQ(a.tokens.size(), 25u);
    EXPECT_EQ(a.tokens, b.tokens);
    for (int e : a.exit_index) EXPECT_EQ(e, -1);
    EXPECT_DOUBLE_EQ(a.AverageLayers(), c.num_layers);
  }
}

// With a low threshold tokens exit early; each fired exit's logits equal that exit's logits in
// a full pass over the same tokens (so the recomputed K/V it attended to were right), and after
// FinishPending every layer's K/V equals the full pass's.
TEST_P(GeneratorTest, EarlyExitRecomputesKv) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 31, 0.8f);
  auto prompt = testing::RandomTokens(4, c.vocab_size, 32);
  // Find a threshold at which some tokens exit early and some run the full depth.
  bool found = false;
  for (float th = 0.15f; th < 0.95f && !found; th += 0.05f) {
    EarlyExitParams ee;
    ee.threshold = th;
    Generator g(m.get(), 32);
    SamplingParams sp;
    auto res = *g.Generate(prompt, 24, -1, sp, ee);
    int early = 0, full_depth = 0;
    for (int e : res.exit_index) (e >= 0 ? early : full_depth)++;
    if (early == 0 || full_depth == 0) continue;
    found = true;
    // Replay the same tokens step by step, checking each step's head output.
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), res.tokens.begin(), res.tokens.end());
    FullPass full = RunFull(*m, all);
    Generator g2(m.get(), 32);
    StepResult r = g2.Step(prompt, ee);
    std::vector<int> depths;
    for (size_t i = 0; i < res.tokens.size(); ++i) {
      const int p = static_cast<int>(prompt.size() + i) - 1;  // position that produced token i
      const auto& ref = r.exit_index < 0 ? full.final_logits[p] : full.exit_logits[r.exit_index][p];
      EXPECT_LT(MaxAbsDiff(r.logits.data(), ref.data(), c.vocab_size), 1e-4)
          << "token " << i << " exit " << r.exit_index;
      EXPECT_EQ(r.exit_index, res.exit_index[i]);
      if (i + 1 < res.tokens.size()) r = g2.Step({res.tokens[i]}, ee);
    }
    // The last generated token was never fed back; feed it so every K/V row exists.
    g2.Step({res.tokens.back()}, ee);
    g2.FinishPending();
    EXPECT_EQ(g2.pending_start(), g2.length());
    ExpectCacheMatches(g2, 0, full);
    EXPECT_LT(res.AverageLayers(), c.num_layers);
  }
  EXPECT_TRUE(found) << "no threshold gave a mix of early and full-depth tokens";
}

TEST_P(GeneratorTest, ExitLayersRestrictWhichExitsFire) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 41, 0.8f);
  auto prompt = testing::RandomTokens(3, c.vocab_size, 42);
  EarlyExitParams ee;
  ee.threshold = 0.01f;  // every allowed exit fires
  ee.exit_layers = {3};
  Generator g(m.get(), 32);
  auto res = *g.Generate(prompt, 10, -1, SamplingParams{}, ee);
  for (size_t i = 0; i < res.tokens.size(); ++i) {
    EXPECT_EQ(res.exit_index[i], 2);
    EXPECT_EQ(res.depth[i], 3);
  }
}

// Each sequence of a batch gets what it gets alone: the same tokens, exits and depths, and
// log-probabilities within rounding. Afterwards every sequence's K/V equal a full pass's.
TEST_P(GeneratorTest, BatchMatchesEachSequenceAloneAndKeepsKvComplete) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 61, 0.8f);
  const std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  Generator batch(m.get(), 32, 4), alone(m.get(), 32);
  std::vector<int> streamed(4, 0);
  auto res = *batch.GenerateBatch(reqs, [&](int i, int32_t) { streamed[i]++; });
  ASSERT_EQ(res.size(), 4u);
  int early = 0, full_depth = 0;
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(::testing::Message() << "sequence " << i);
    auto one = *alone.GenerateBatch({reqs[i]});
    ASSERT_EQ(res[i].tokens.size(), static_cast<size_t>(reqs[i].max_new_tokens));
    EXPECT_EQ(streamed[i], reqs[i].max_new_tokens);
    EXPECT_EQ(res[i].finish, FinishReason::kLength);
    EXPECT_EQ(res[i].tokens, one[0].tokens);
    EXPECT_EQ(res[i].exit_index, one[0].exit_index);
    EXPECT_EQ(res[i].depth, one[0].depth);
    ASSERT_EQ(res[i].logprobs.size(), one[0].logprobs.size());
    for (size_t t = 0; t < res[i].logprobs.size(); ++t) {
      EXPECT_NEAR(res[i].logprobs[t], one[0].logprobs[t], 1e-4) << "token " << t;
      EXPECT_LE(res[i].logprobs[t], 0.0f);
    }
    for (int e : res[i].exit_index) (e >= 0 ? early : full_depth)++;
    if (reqs[i].early_exit.threshold >= 1) {
      for (int e : res[i].exit_index) EXPECT_EQ(e, -1);
    }
    if (i == 3) {  // exit 1 (layer 2) is not allowed
      for (int e : res[i].exit_index) EXPECT_NE(e, 1);
    }
  }
  EXPECT_GT(early, 5);
  EXPECT_GT(full_depth, 5);
  // Feed every sequence's last token, complete the pending rows, and compare the caches.
  std::vector<std::vector<int32_t>> last(4);
  std::vector<EarlyExitParams> ee(4);
  for (int i = 0; i < 4; ++i) {
    last[i] = {res[i].tokens.back()};
    ee[i] = reqs[i].early_exit;
  }
  batch.StepBatch(last, ee);
  batch.FinishPending();
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> all = reqs[i].prompt;
    all.insert(all.end(), res[i].tokens.begin(), res[i].tokens.end());
    EXPECT_EQ(batch.length(i), static_cast<int>(all.size()));
    EXPECT_EQ(batch.pending_start(i), batch.length(i));
    FullPass full = RunFull(*m, all);
    ExpectCacheMatches(batch, i, full);
  }
}

// A sequence that stops (stop callback or EOS) leaves the batch; the others go on unchanged.
TEST_P(GeneratorTest, SequencesFinishOnTheirOwn) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 71, 0.8f);
  std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  Generator g(m.get(), 32, 4);
  auto plain = *g.GenerateBatch(reqs);
  reqs[0].stop = [](const std::vector<int32_t>& t) { return t.size() == 3; };
  reqs[2].eos_id = plain[2].tokens[4];
  auto res = *g.GenerateBatch(reqs);
  EXPECT_EQ(res[0].finish, FinishReason::kStop);
  EXPECT_EQ(res[0].tokens,
            std::vector<int32_t>(plain[0].tokens.begin(), plain[0].tokens.begin() + 3));
  EXPECT_EQ(res[2].finish, FinishReason::kEos);
  EXPECT_TRUE(res[2].stopped_at_eos());
  EXPECT_LE(res[2].tokens.size(), 5u);
  EXPECT_EQ(res[2].tokens.back(), reqs[2].eos_id);
  for (int i : {1, 3}) {
    EXPECT_EQ(res[i].finish, FinishReason::kLength);
    EXPECT_EQ(res[i].tokens, plain[i].tokens) << "sequence " << i;
  }
}

// Continuous batching: a sequence admitted while others decode (its prefill shares their pass),
// and one taking the slot another just left, get what they get alone, and so do the others.
TEST_P(GeneratorTest, SequencesJoinAndLeaveARunningBatch) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 91, 0.8f);
  const std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  Generator g(m.get(), 32, 3), alone(m.get(), 32);
  std::vector<int> owner(3, -1);  // slot -> request
  std::vector<GenerationResult> got(reqs.size());
  int admitted = 0, reused_slot = -1;
  auto admit = [&] {
    auto slot = g.Admit(reqs[admitted]);
    ASSERT_TRUE(slot.ok()) << slot.status();
    owner[*slot] = admitted++;
  };
  auto advance = [&] {
    std::vector<int> freed;
    for (Generator::Finished& f : g.Advance()) {
      got[owner[f.slot]] = std::move(f.result);
      freed.push_back(f.slot);
    }
    return freed;
  };
  admit();
  admit();
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(advance().empty());
  admit();  // joins two sequences 3 tokens into their decode
  EXPECT_EQ(g.free_slots(), 0);
  auto full = g.Admit(reqs[3]);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  while (admitted < 4) {
    std::vector<int> freed = advance();
    if (!freed.empty()) {
      reused_slot = freed[0];
      admit();
    }
  }
  while (g.active() > 0) advance();
  EXPECT_GE(reused_slot, 0);
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto one = *alone.GenerateBatch({reqs[i]});
    EXPECT_EQ(got[i].tokens, one[0].tokens) << "request " << i;
    EXPECT_EQ(got[i].exit_index, one[0].exit_index) << "request " << i;
    EXPECT_EQ(got[i].depth, one[0].depth) << "request " << i;
    EXPECT_EQ(static_cast<int>(got[i].tokens.size()), reqs[i].max_new_tokens);
  }
}

// Exits at depth 0 (norm, pre), 2 (block) and 3 (MLP or block): recomputed K/V must pass through
// block exits below the top as well.
ModelConfig DeepBlockExitsConfig(ModelStyle style, bool two_blocks) {
  ModelConfig c = TinyConfig(style, 4);
  c.vocab_size = 16;
  ExitConfig a, b, d;
  a.layer = 1;
  a.kind = ExitKind::kNorm;
  a.position = ExitPosition::kPre;
  b.layer = 2;
  b.kind = ExitKind::kBlock;
  d.layer = 3;
  d.kind = two_blocks ? ExitKind::kBlock : ExitKind::kMlp;
  d.temperature = 0.8f;
  c.exits = {a, b, d};
  return c;
}

// One paged KV cache shared by the requests, pages reserved per request (as pipelines take
// them): each admitted sequence takes the pages of prompt + max_new_tokens wherever they are
// free; a request waits (CanAdmit false, Admit refused naming the room) until finished sequences
// free enough pages. Two pages freed apart
// from each other serve one sequence (ranges of the cache could not). Every sequence gets what
// it gets alone.
TEST_P(GeneratorTest, SequencesShareOnePagedKvCache) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 93, 0.8f);
  std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  // prompt + max_new_tokens: 16 (1 page), 32 (2), 16 (1), 31 (2) tokens; sequences 0 and 2
  // end first, sequence 1 last.
  reqs[0].max_new_tokens = 7;
  reqs[1].max_new_tokens = 18;
  reqs[2].max_new_tokens = 13;
  Generator g(m.get(), 32, 4, /*kv_tokens=*/60), alone(m.get(), 32);
  g.ReserveKvPerRequest();
  EXPECT_EQ(g.kv_tokens(), 64);  // whole pages of 16
  std::vector<int> owner(4, -1);
  std::vector<GenerationResult> got(reqs.size());
  auto admit = [&](int i) {
    auto slot = g.Admit(reqs[i]);
    ASSERT_TRUE(slot.ok()) << slot.status();
    owner[*slot] = i;
  };
  for (int i = 0; i < 3; ++i) admit(i);
  EXPECT_EQ(g.kv_pages(0), std::vector<int32_t>({0}));
  EXPECT_EQ(g.kv_pages(1), std::vector<int32_t>({1, 2}));
  EXPECT_EQ(g.kv_pages(2), std::vector<int32_t>({3}));
  EXPECT_EQ(g.kv_tokens_in_use(), 64);
  EXPECT_GT(g.free_slots(), 0);
  EXPECT_FALSE(g.CanAdmit(reqs[3]));
  auto refused = g.Admit(reqs[3]);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("no room for 31 tokens (0 of 64 free)"),
            std::string::npos)
      << refused.status();
  int next = 3, active_when_3_joined = -1;
  std::vector<int32_t> pages_of_3;
  while (g.active() > 0 || next < 4) {
    if (next == 3 && g.CanAdmit(reqs[3])) {
      active_when_3_joined = g.active();
      admit(next++);
      for (int s = 0; s < 4; ++s) {
        if (owner[s] == 3) pages_of_3 = g.kv_pages(s);
      }
    }
    for (Generator::Finished& f : g.Advance()) got[owner[f.slot]] = std::move(f.result);
  }
  EXPECT_EQ(active_when_3_joined, 1);  // sequence 1 still runs, between its pages
  EXPECT_EQ(pages_of_3, std::vector<int32_t>({0, 3}));
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto one = *alone.GenerateBatch({reqs[i]});
    EXPECT_EQ(got[i].tokens, one[0].tokens) << "request " << i;
    EXPECT_EQ(got[i].exit_index, one[0].exit_index) << "request " << i;
    EXPECT_EQ(got[i].depth, one[0].depth) << "request " << i;
  }
  EXPECT_EQ(g.kv_tokens_in_use(), 0);
  // GenerateBatch admits the same way: all four (95 tokens) through the 64-token cache.
  const std::vector<GenerationResult> batch = *g.GenerateBatch(reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(batch[i].tokens, got[i].tokens) << "request " << i;
    EXPECT_EQ(batch[i].exit_index, got[i].exit_index) << "request " << i;
  }
  // A request longer than the whole cache is refused as invalid, not left waiting.
  GenerationRequest big = reqs[0];
  big.max_new_tokens = 23;  // 9 + 23 = 32 <= the context, > a 16-token cache
  Generator small(m.get(), 32, 2, /*kv_tokens=*/16);
  const absl::Status bad = small.Validate(big);
  EXPECT_NE(bad.message().find("= 32 exceeds the KV cache's 16 tokens"), std::string::npos) << bad;
}

// A pool too small for the running sequences' growth (3 pages; each sequence reaches 2): the
// latest admitted are preempted and resume later, recomputing their K/V. Every sequence's tokens,
// exits and depths are those it gets alone: greedy, sampled, early exit and speculative.
TEST_P(GeneratorTest, PreemptedSequencesResumeWithTheSameTokens) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 97, 0.8f);
  std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  GenerationRequest spec = reqs[0];  // greedy: its drafts dropped on preemption do not matter
  spec.prompt = testing::RandomTokens(6, c.vocab_size, 71);
  spec.speculative.exit_layer = c.exits[1].layer;
  spec.speculative.draft_tokens = 3;
  reqs.push_back(spec);
  Generator g(m.get(), 32, 5, /*kv_tokens=*/48), alone(m.get(), 32);
  auto got = g.GenerateBatch(reqs);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_GE(g.preemptions(), 2);
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto one = *alone.GenerateBatch({reqs[i]});
    EXPECT_EQ((*got)[i].tokens, one[0].tokens) << "request " << i;
    EXPECT_EQ((*got)[i].exit_index, one[0].exit_index) << "request " << i;
    EXPECT_EQ((*got)[i].depth, one[0].depth) << "request " << i;
    ASSERT_EQ((*got)[i].logprobs.size(), one[0].logprobs.size());
    for (size_t t = 0; t < one[0].logprobs.size(); ++t) {
      EXPECT_NEAR((*got)[i].logprobs[t], one[0].logprobs[t], 1e-4) << "request " << i;
    }
  }
  EXPECT_EQ(g.kv_tokens_in_use(), 0);
  // While a preempted sequence waits, nothing new is admitted ahead of it.
  Generator h(m.get(), 32, 3, /*kv_tokens=*/32);
  ASSERT_TRUE(h.Admit(reqs[0]).ok());  // 9 tokens, to 29
  ASSERT_TRUE(h.Admit(reqs[2]).ok());  // 3 tokens, to 20
  while (h.preemptions() == 0) h.Advance();
  EXPECT_FALSE(h.CanAdmit(reqs[2]));
}

// A finished sequence's pages are free for the next one; completing pending rows afterwards
// (FinishPending) must not write into them. Sequence A (slot 1) ends with early-exited rows
// still pending; B (slot 0) takes A's page; B's tokens are those it gets alone.
TEST_P(GeneratorTest, FinishPendingLeavesReleasedRangesAlone) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 95, 0.8f);
  const std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  GenerationRequest a = reqs[2], b = reqs[0];
  a.max_new_tokens = 6;
  a.early_exit.threshold = 1e-6f;  // every token exits at the first exit: its rows pend
  b.early_exit.threshold = 1.0f;
  Generator g(m.get(), 32, 2, /*kv_tokens=*/32), alone(m.get(), 32);
  ASSERT_TRUE(g.Admit(a, 1).ok());
  EXPECT_EQ(g.kv_pages(1), std::vector<int32_t>({0}));
  while (g.active() > 0) g.Advance();
  auto slot = g.Admit(b, 0);
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(g.kv_pages(0), std::vector<int32_t>({0}));
  std::vector<GenerationResult> got;
  for (bool first = true; g.active() > 0; first = false) {
    for (Generator::Finished& f : g.Advance()) got.push_back(std::move(f.result));
    if (first) g.FinishPending();
  }
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].tokens, (*alone.GenerateBatch({b}))[0].tokens);
}

class BatchAgainstFullPass
    : public ::testing::TestWithParam<std::tuple<ModelStyle, bool, int, int>> {};

// Batches of 3 or 5 sequences, capacity 12 or 24 (some sequences fill it exactly; the prefill
// splits into groups), mixed thresholds, allowed exits and sampling: every token against a
// full pass.
TEST_P(BatchAgainstFullPass, EveryTokenAndExitMatches) {
  const auto [style, two_blocks, capacity, n] = GetParam();
  const ModelConfig c = DeepBlockExitsConfig(style, two_blocks);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 91 + two_blocks, 0.8f);
  Generator g(m.get(), capacity, n);
  const float thresholds[] = {1.0f, 0.3f, 0.2f, 0.45f, 0.25f, 0.35f};
  int early = 0;
  for (int trial = 0; trial < 4; ++trial) {
    std::vector<GenerationRequest> reqs(n);
    for (int i = 0; i < n; ++i) {
      const int len = 1 + (7 * i + 3 * trial) % 9;
      reqs[i].prompt = testing::RandomTokens(len, c.vocab_size, 100 * trial + i);
      reqs[i].max_new_tokens = capacity - len - i % 3;
      reqs[i].early_exit.threshold = thresholds[(i + trial) % 6];
      reqs[i].sampling.temperature = (i + trial) % 2 ? 0.9f : 0.0f;
      reqs[i].sampling.seed = i + 7 * trial;
      if ((i + trial) % 4 == 3) reqs[i].early_exit.exit_layers = {2, 3};
      if ((i + trial) % 5 == 4) reqs[i].early_exit.exit_layers = {1};
    }
    auto res = *g.GenerateBatch(reqs);
    for (int i = 0; i < n; ++i) {
      SCOPED_TRACE(::testing::Message() << "trial " << trial << " sequence " << i);
      ExpectMatchesFullPass(*m, reqs[i], res[i]);
      for (int e : res[i].exit_index) early += e >= 0;
    }
  }
  EXPECT_GT(early, 20);
}

INSTANTIATE_TEST_SUITE_P(Configs, BatchAgainstFullPass,
                         ::testing::Combine(::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama),
                                            ::testing::Bool(), ::testing::Values(12, 24),
                                            ::testing::Values(3, 5)));

// Qwen3 and Llama 3.1 attention together: q and k norms, heads of 6 over a hidden size of 8,
// and llama3-scaled RoPE (of the 3 pairs, one kept, one blended, one divided). Decoding with
// the KV cache gives a full pass's logits and cache, and batched early exit a full pass's tokens.
TEST(Generator, Qwen3StyleAttentionMatchesFullPass) {
  ModelConfig c = ConfigWithExits(ModelStyle::kLlama);
  c.qk_norm = true;
  c.explicit_head_dim = 6;
  c.rope_scaling = {RopeScalingKind::kLlama3, 4.0f, 1.0f, 2.0f, 256};
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 13, 0.8f);
  ExpectDecodingMatchesFullPass(*m, testing::RandomTokens(20, c.vocab_size, 14));
  Generator batch(m.get(), 24, 3);
  std::vector<GenerationRequest> reqs(3);
  int early = 0;
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = testing::RandomTokens(3 + 2 * i, c.vocab_size, 20 + i);
    reqs[i].max_new_tokens = 14;
    reqs[i].early_exit.threshold = 0.25f + 0.1f * i;
  }
  auto res = *batch.GenerateBatch(reqs);
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(::testing::Message() << "sequence " << i);
    ExpectMatchesFullPass(*m, reqs[i], res[i]);
    for (int e : res[i].exit_index) early += e >= 0;
  }
  EXPECT_GT(early, 0);
}

TEST(Generator, BatchErrorsNameThePromptAndTheValue) {
  ModelConfig c = ConfigWithExits(ModelStyle::kLlama);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  Generator g(m.get(), 32, 2);
  std::vector<GenerationRequest> reqs(2);
  reqs[0].prompt = {1, 2};
  reqs[0].max_new_tokens = 4;
  reqs[1] = reqs[0];
  reqs[1].prompt = {3, 16};
  auto r = g.GenerateBatch(reqs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("prompt 1: prompt token 16"), std::string::npos)
      << r.status();
  reqs[1] = reqs[0];
  reqs[1].early_exit.exit_layers = {2, 4};
  r = g.GenerateBatch(reqs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("exit layer 4"), std::string::npos) << r.status();
  reqs[1] = reqs[0];
  reqs[1].sampling.temperature = std::numeric_limits<float>::infinity();
  EXPECT_NE(g.GenerateBatch(reqs).status().message().find("temperature must be >= 0"),
            std::string::npos);
  reqs[1] = reqs[0];
  reqs[1].sampling.top_p = 0;
  EXPECT_NE(g.GenerateBatch(reqs).status().message().find("top_p"), std::string::npos);
  reqs[1] = reqs[0];
  reqs[1].max_new_tokens = 2147483647;  // prompt + this overflows an int
  r = g.GenerateBatch(reqs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("max_new_tokens (2147483647)"), std::string::npos)
      << r.status();
  reqs.resize(3, reqs[0]);
  r = g.GenerateBatch(reqs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("3 prompts"), std::string::npos) << r.status();
}

// Prompt scoring: each prompt token's log-probability and its position's most likely tokens are
// the final head's in a full pass, however many projections the prompt takes (99 rows, 64 a
// projection); the final head decides the first token, exits the later ones (early exit on);
// max_new_tokens 0 scores only, up to a prompt as long as the context; a sequence beside them
// that does not score gets what it gets alone.
TEST_P(GeneratorTest, ScoresThePromptWithTheFinalHead) {
  ModelConfig c = ConfigWithExits(GetParam());
  c.max_seq_len = 128;
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 71, 0.5f);
  std::vector<GenerationRequest> reqs(2);
  reqs[0].prompt = testing::RandomTokens(100, c.vocab_size, 72);
  reqs[0].max_new_tokens = 5;
  reqs[0].prompt_logprobs = true;
  reqs[0].top_logprobs = 3;
  reqs[0].early_exit.threshold = 0.2f;
  reqs[1].prompt = testing::RandomTokens(6, c.vocab_size, 73);
  reqs[1].max_new_tokens = 8;
  reqs[1].early_exit.threshold = 0.4f;
  Generator g(m.get(), c.max_seq_len, 2);
  for (int max_new : {5, 0, -1}) {  // -1: max_new_tokens 0 and a prompt of the whole context
    if (max_new < 0) reqs[0].prompt = testing::RandomTokens(c.max_seq_len, c.vocab_size, 74);
    reqs[0].max_new_tokens = std::max(max_new, 0);
    max_new = reqs[0].max_new_tokens;
    const int n = static_cast<int>(reqs[0].prompt.size());
    const auto got = *g.GenerateBatch(reqs);
    const GenerationResult& s = got[0];
    ASSERT_EQ(s.prompt_logprobs.size(), n - 1u);
    ASSERT_EQ(s.prompt_top.size(), n - 1u);
    ASSERT_EQ(s.tokens.size(), static_cast<size_t>(max_new));
    ASSERT_EQ(s.top.size(), static_cast<size_t>(max_new));
    const FullPass full = RunFull(*m, reqs[0].prompt);
    for (int p = 0; p + 1 < n; ++p) {
      const float* ref = full.final_logits[p].data();
      EXPECT_NEAR(s.prompt_logprobs[p], LogProbability(ref, c.vocab_size, reqs[0].prompt[p + 1]),
                  2e-4)
          << "position " << p;
      const TopTokens want = TopLogProbabilities(ref, c.vocab_size, 3);
      ASSERT_EQ(s.prompt_top[p].size(), 3u);
      for (int j = 0; j < 3; ++j) {
        EXPECT_EQ(s.prompt_top[p][j].first, want[j].first) << "position " << p;
        EXPECT_NEAR(s.prompt_top[p][j].second, want[j].second, 2e-4) << "position " << p;
      }
    }
    ExpectMatchesFullPass(*m, reqs[0], s);
    for (size_t t = 0; t < s.tokens.size(); ++t) {  // the producing head's most likely tokens
      EXPECT_GE(s.top[t][0].second, s.logprobs[t] - 1e-6f);
      EXPECT_GE(s.top[t][0].second, s.top[t][1].second);
    }
    if (max_new > 0) {
      EXPECT_EQ(s.exit_index[0], -1);
      EXPECT_GT(
          std::count_if(s.exit_index.begin(), s.exit_index.end(), [](int e) { return e >= 0; }), 0)
          << "no early exit after the scoring prefill";
    }
    Generator alone(m.get(), c.max_seq_len, 1);
    EXPECT_EQ(got[1].tokens, alone.GenerateBatch({reqs[1]})->at(0).tokens);
    EXPECT_TRUE(got[1].prompt_logprobs.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(Styles, GeneratorTest,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

TEST(Generator, ScoringErrorsNameTheValue) {
  ModelConfig c = ConfigWithExits(ModelStyle::kLlama);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  Generator g(m.get(), 32);
  GenerationRequest q;
  q.prompt = {1, 2};
  q.max_new_tokens = 0;
  EXPECT_EQ(g.Validate(q).message(),
            "max_new_tokens must be >= 1 (0 only to score the prompt), got 0");
  q.prompt_logprobs = true;
  EXPECT_TRUE(g.Validate(q).ok());
  q.top_logprobs = 21;
  EXPECT_EQ(g.Validate(q).message(), "top_logprobs must be in [0, 20], got 21");
}

TEST(Generator, RejectsTooLongRequests) {
  ModelConfig c = TinyConfig(ModelStyle::kGpt);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  Generator g(m.get(), 16);
  auto r = g.Generate(std::vector<int32_t>(10, 1), 10, -1, SamplingParams{}, EarlyExitParams{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("20"), std::string::npos) << r.status();
  auto r2 = g.Generate({1, 99}, 2, -1, SamplingParams{}, EarlyExitParams{});
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.status().message().find("99"), std::string::npos) << r2.status();
}

TEST(Generator, StopsAtEos) {
  ModelConfig c = TinyConfig(ModelStyle::kGpt);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 51);
  Generator g(m.get(), 32);
  auto first = *g.Generate({1, 2, 3}, 10, -1, SamplingParams{}, EarlyExitParams{});
  const int32_t eos = first.tokens[3];
  auto r = *g.Generate({1, 2, 3}, 10, eos, SamplingParams{}, EarlyExitParams{});
  EXPECT_TRUE(r.stopped_at_eos());
  EXPECT_LE(r.tokens.size(), 4u);
  EXPECT_EQ(r.tokens.back(), eos);
}

// A vocabulary padded past the tokenizer (set_token_limit): the padded ids are never sampled,
// never chosen greedily, never listed among the top log-probabilities, and refused in prompts;
// without the limit the same requests do produce them (the check can fail).
TEST_P(GeneratorTest, TokenLimitKeepsPaddedIdsOut) {
  ModelConfig c = ConfigWithExits(GetParam());  // vocabulary 16
  const int limit = 11;
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 71, 0.5f);
  std::vector<GenerationRequest> reqs(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = testing::RandomTokens(4, limit, 72 + i);
    reqs[i].max_new_tokens = 25;
    reqs[i].sampling.temperature = i == 2 ? 0.0f : 1.0f;  // the last greedy
    reqs[i].sampling.seed = 73 + i;
    reqs[i].early_exit.threshold = i == 2 ? 1.0f : 0.3f;  // the greedy one: the final head
    reqs[i].top_logprobs = i == 1 ? 14 : 5;               // 14: more than the ids below the limit
  }
  auto padded = [&](const std::vector<GenerationResult>& rs) {
    int n = 0;
    for (const auto& r : rs) {
      for (int32_t t : r.tokens) n += t >= limit;
      for (const auto& top : r.top) {
        for (const auto& [id, lp] : top) n += id >= limit;
      }
    }
    return n;
  };
  Generator open(m.get(), 32, 3);
  auto without = *open.GenerateBatch(reqs);
  EXPECT_GT(padded(without), 0);
  Generator limited(m.get(), 32, 3);
  limited.set_token_limit(limit);
  auto with = *limited.GenerateBatch(reqs);
  EXPECT_EQ(padded(with), 0);
  int exited = 0;
  for (int i = 0; i < 3; ++i) {
    const GenerationResult& r = with[i];
    ASSERT_EQ(r.tokens.size(), 25u);
    for (size_t k = 0; k < r.tokens.size(); ++k) {
      EXPECT_TRUE(std::isfinite(r.logprobs[k]));
      EXPECT_EQ(r.top[k].size(), i == 1 ? 11u : 5u);
      exited += r.exit_index[k] >= 0;
    }
  }
  EXPECT_GT(exited, 0);
  // Greedy with the limit picks the most likely id below it: the final head's argmax over
  // [0, limit) of a full pass at each position where it produced the token.
  const FullPass full = [&] {
    std::vector<int32_t> ids = reqs[2].prompt;
    ids.insert(ids.end(), with[2].tokens.begin(), with[2].tokens.end());
    return RunFull(*m, ids);
  }();
  int checked = 0;
  for (size_t k = 0; k < with[2].tokens.size(); ++k) {
    ASSERT_EQ(with[2].exit_index[k], -1);
    const std::vector<float>& row = full.final_logits[reqs[2].prompt.size() - 1 + k];
    EXPECT_EQ(with[2].tokens[k], std::max_element(row.begin(), row.begin() + limit) - row.begin());
    ++checked;
  }
  EXPECT_GT(checked, 0);
  GenerationRequest bad = reqs[0];
  bad.prompt[1] = limit;
  EXPECT_NE(limited.Validate(bad).message().find("outside the vocabulary [0, 11)"),
            std::string::npos)
      << limited.Validate(bad);
  EXPECT_TRUE(open.Validate(bad).ok());
}

}  // namespace
}  // namespace eellm
