// Self-speculative decoding: the acceptance rule keeps the full model's distribution, and the
// generator's rounds emit the full model's tokens (greedy: exactly those of plain decoding) with
// every token's log-probability that of the full model at its prefix, so the cache shortening
// after rejected drafts leaves the right K/V.
#include "models/speculative.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "models/generator.h"
#include "tests/models/full_pass.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::ConfigWithExits;
using testing::Cpu;
using testing::ExpectMatchesFullPass;

std::vector<double> Normalised(std::vector<double> w) {
  double s = 0;
  for (double x : w) s += x;
  for (double& x : w) x /= s;
  return w;
}

// Empirical frequencies of `n` draws against `want`, within 5 standard deviations.
void ExpectFrequencies(const std::vector<int>& count, int n, const std::vector<double>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double f = static_cast<double>(count[i]) / n;
    const double sd = std::sqrt(want[i] * (1 - want[i]) / n);
    EXPECT_NEAR(f, want[i], 5 * sd + 1e-12) << "token " << i;
  }
}

// Drafts drawn from q and checked against p come out distributed as p, and the share kept is
// sum(min(p, q)); tokens q never proposes and tokens p never takes included.
TEST(Speculative, VerifiedDraftsFollowTheFullModel) {
  const std::vector<double> p = Normalised({0.30, 0.05, 0.25, 0.0, 0.40, 0.0});
  const std::vector<double> q = Normalised({0.10, 0.35, 0.0, 0.20, 0.25, 0.10});
  Rng rng(5);
  const int n = 400000;
  std::vector<int> count(p.size());
  int kept = 0;
  for (int t = 0; t < n; ++t) {
    const int32_t d = SampleFrom(q, rng);
    const DraftVerdict v = VerifyDraft(p, q, d, rng);
    ASSERT_TRUE(!v.accepted || v.token == d);
    ASSERT_GT(p[v.token], 0) << "a token the full model never takes";
    ++count[v.token];
    kept += v.accepted;
  }
  ExpectFrequencies(count, n, p);
  double overlap = 0;
  for (size_t i = 0; i < p.size(); ++i) overlap += std::min(p[i], q[i]);
  EXPECT_NEAR(static_cast<double>(kept) / n, overlap, 0.005);
}

TEST(Speculative, GreedyKeepsADraftIffItIsTheFullModelsToken) {
  Rng rng(1);
  const std::vector<double> p = {0, 1, 0}, q = {0, 0, 1};
  DraftVerdict v = VerifyDraft(p, q, 2, rng);
  EXPECT_FALSE(v.accepted);
  EXPECT_EQ(v.token, 1);
  v = VerifyDraft(p, p, 1, rng);
  EXPECT_TRUE(v.accepted);
  EXPECT_EQ(v.token, 1);
}

// TokenDistribution is the distribution SampleToken draws from, truncations included.
TEST(Speculative, TokenDistributionIsWhatSampleTokenDraws) {
  const std::vector<float> logits = {1.5f, -0.5f, 2.0f, 0.3f, 2.0f, -3.0f, 0.9f};
  const int v = static_cast<int>(logits.size());
  for (SamplingParams sp : {SamplingParams{0.8f, 0, 1.0f, 1}, SamplingParams{1.3f, 4, 1.0f, 2},
                            SamplingParams{1.0f, 0, 0.7f, 3}, SamplingParams{0.0f, 0, 1.0f, 4}}) {
    const std::vector<double> want = TokenDistribution(logits.data(), v, sp);
    double sum = 0;
    for (double x : want) sum += x;
    EXPECT_NEAR(sum, 1.0, 1e-12);
    if (sp.top_k > 0) EXPECT_EQ(want[5] + want[1], 0.0) << "outside the top 4";
    Rng rng(sp.seed);
    const int n = 200000;
    std::vector<int> count(v);
    for (int t = 0; t < n; ++t) {
      std::vector<float> scratch = logits;
      ++count[SampleToken(scratch, sp, rng)];
    }
    ExpectFrequencies(count, n, want);
  }
}

// What greedy drafting by exit `x`, at most `drafts` a round and ending a round at a draft less
// confident than `floor`, keeps of the full model's `tokens` for `prompt`, replayed with full
// passes: each draft is the exit's top token after the sequence so far and the drafts before it.
// {drafted, kept}; {-1, -1} when a confidence lies within rounding of the floor.
std::pair<int, int> ReplayGreedyDrafts(Model& m, const std::vector<int32_t>& prompt,
                                       const std::vector<int32_t>& tokens, int x, int drafts,
                                       float floor) {
  const int vocab = m.config().vocab_size;
  int drafted = 0, kept = 0;
  for (size_t emitted = 1; emitted < tokens.size();) {
    const int round = std::min<int>(drafts, static_cast<int>(tokens.size() - emitted) - 1);
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), tokens.begin(), tokens.begin() + emitted);
    int j = 0, k = 0;
    bool agree = true;
    for (bool more = true; more && k < round; ++k) {
      const std::vector<float> e = testing::RunFull(m, seq).exit_logits[x].back();
      const int32_t d =
          static_cast<int32_t>(std::max_element(e.begin(), e.begin() + vocab) - e.begin());
      agree &= d == tokens[emitted + k];
      j += agree;
      seq.push_back(d);
      const float confidence = MaxProbability(e.data(), vocab, m.config().exits[x].temperature);
      if (std::fabs(confidence - floor) < 1e-4) return {-1, -1};
      more = confidence >= floor;
    }
    drafted += k;
    kept += j;
    emitted += j + 1;
  }
  return {drafted, kept};
}

class SpeculativeGeneration : public ::testing::TestWithParam<ModelStyle> {};

GenerationRequest Request(const std::vector<int32_t>& prompt, int max_new, int exit_layer,
                          int drafts) {
  GenerationRequest q;
  q.prompt = prompt;
  q.max_new_tokens = max_new;
  q.speculative.exit_layer = exit_layer;
  q.speculative.draft_tokens = drafts;
  return q;
}

// Greedy: whichever exit drafts and however many tokens a round drafts, the tokens are plain
// decoding's, each scored by the full model at its prefix; the drafts are the exit's (those
// kept and checked equal a replay with full passes), and some are kept, some rejected.
TEST_P(SpeculativeGeneration, GreedyEmitsTheFullModelsTokens) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 31, 0.5f);
  std::vector<GenerationRequest> plain;
  for (int i = 0; i < 3; ++i) {
    plain.push_back(Request(testing::RandomTokens(4 + 3 * i, c.vocab_size, 40 + i), 20, 0, 4));
  }
  Generator base(m.get(), c.max_seq_len, 3);
  const auto want = *base.GenerateBatch(plain);
  int drafted = 0, kept = 0, short_rounds = 0;
  for (const ExitConfig& x : c.exits) {
    for (auto [drafts, floor] : {std::pair{1, 0.0f}, std::pair{3, 0.0f},
                                 std::pair{kMaxDraftTokens, 0.0f}, std::pair{5, 0.3f}}) {
      std::vector<GenerationRequest> spec = plain;
      for (auto& q : spec) q.speculative = {x.layer, drafts, floor};
      Generator g(m.get(), c.max_seq_len, 3);
      const auto got = *g.GenerateBatch(spec);
      for (size_t i = 0; i < spec.size(); ++i) {
        SCOPED_TRACE(::testing::Message() << "exit layer " << x.layer << ", " << drafts
                                          << " drafts, floor " << floor << ", sequence " << i);
        EXPECT_EQ(got[i].tokens, want[i].tokens);
        for (int e : got[i].exit_index) EXPECT_EQ(e, -1);
        ExpectMatchesFullPass(*m, spec[i], got[i]);
        const auto [want_drafted, want_kept] =
            ReplayGreedyDrafts(*m, spec[i].prompt, want[i].tokens,
                               static_cast<int>(&x - c.exits.data()), drafts, floor);
        if (want_drafted >= 0) {
          EXPECT_EQ(got[i].drafted, want_drafted);
          EXPECT_EQ(got[i].accepted, want_kept);
        }
        if (floor > 0 && want_drafted >= 0) {  // the floor cut rounds short
          short_rounds += ReplayGreedyDrafts(*m, spec[i].prompt, want[i].tokens,
                                             static_cast<int>(&x - c.exits.data()), drafts, 0)
                              .first > want_drafted;
        }
        drafted += got[i].drafted;
        kept += got[i].accepted;
      }
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, drafted);
  EXPECT_GT(short_rounds, 0) << "the confidence floor never ended a round";
}

// Sampling, with a speculative, an early-exit and a plain sequence joining one batch, in a
// shared KV cache that is just large enough: every token of the speculative sequence is scored
// by the full model at its prefix; the others get what they get alone; stop rules end a round
// part-way.
TEST_P(SpeculativeGeneration, SamplingInAMixedBatch) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 32, 0.5f);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest q = Request(testing::RandomTokens(5 + i, c.vocab_size, 50 + i), 20, 0, 4);
    q.sampling.temperature = 0.9f;
    q.sampling.top_k = 10;
    q.sampling.seed = 60 + i;
    reqs.push_back(q);
  }
  reqs[0].speculative = {2, 5};
  reqs[1].early_exit.threshold = 0.3f;
  int tokens = 0;
  for (const auto& q : reqs) tokens += Generator::RequestTokens(q);
  Generator g(m.get(), c.max_seq_len, 3, tokens);
  const auto got = *g.GenerateBatch(reqs);
  ExpectMatchesFullPass(*m, reqs[0], got[0]);
  EXPECT_EQ(got[0].tokens.size(), 20u);
  EXPECT_GT(got[0].drafted, 0);
  for (int i = 1; i < 3; ++i) {
    Generator alone(m.get(), c.max_seq_len, 1);
    EXPECT_EQ(got[i].tokens, alone.GenerateBatch({reqs[i]})->at(0).tokens) << "sequence " << i;
  }
  // Stop rules: EOS and a stop callback end the sequence at that token, mid-round.
  GenerationRequest q = reqs[0];
  q.eos_id = got[0].tokens[7];
  auto eos = *g.GenerateBatch({q});
  EXPECT_EQ(eos[0].finish, FinishReason::kEos);
  const auto first = std::find(got[0].tokens.begin(), got[0].tokens.end(), q.eos_id);
  EXPECT_EQ(eos[0].tokens, std::vector<int32_t>(got[0].tokens.begin(), first + 1))
      << "the same draws, up to the first EOS";
  ExpectMatchesFullPass(*m, q, eos[0]);
  q.eos_id = -1;
  q.stop = [](const std::vector<int32_t>& t) { return t.size() == 6; };
  auto stop = *g.GenerateBatch({q});
  EXPECT_EQ(stop[0].finish, FinishReason::kStop);
  ASSERT_EQ(stop[0].tokens.size(), 6u);
  ExpectMatchesFullPass(*m, q, stop[0]);
}

// Continuous batching: a speculative sequence joins while another is part-way through a round,
// the first is retired mid-round and its slot taken by a plain sequence; every sequence gets the
// full model's greedy tokens (the retired one a prefix of them).
TEST_P(SpeculativeGeneration, JoinsAndLeavesMidRound) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 35, 0.5f);
  GenerationRequest a = Request(testing::RandomTokens(4, c.vocab_size, 36), 16, 2, 4);
  GenerationRequest b = Request(testing::RandomTokens(7, c.vocab_size, 37), 14, 3, 3);
  GenerationRequest d = Request(testing::RandomTokens(3, c.vocab_size, 38), 12, 0, 4);
  auto plain = [&](GenerationRequest q) {
    q.speculative = SpeculativeParams();
    Generator alone(m.get(), c.max_seq_len, 1);
    return alone.GenerateBatch({q})->at(0).tokens;
  };
  Generator g(m.get(), c.max_seq_len, 2);
  std::vector<GenerationResult> done(3);
  auto advance = [&](const std::vector<int>& which) {
    for (FinishedSequence& f : g.Advance()) done[which.at(f.slot)] = std::move(f.result);
  };
  std::vector<int> which(2, -1);  // slot -> request
  which[*g.Admit(a)] = 0;
  for (int i = 0; i < 3; ++i) advance(which);  // the prefill and two drafts: mid-round
  const int slot_b = *g.Admit(b);
  which[slot_b] = 1;
  for (int i = 0; i < 2; ++i) advance(which);
  const int slot_a = 1 - slot_b;
  GenerationResult retired = g.Retire(slot_a);
  which[*g.Admit(d, slot_a)] = 2;
  while (g.active() > 0) advance(which);
  const std::vector<int32_t> want_a = plain(a);
  ASSERT_GT(retired.tokens.size(), 0u);
  EXPECT_EQ(retired.tokens,
            std::vector<int32_t>(want_a.begin(), want_a.begin() + retired.tokens.size()));
  EXPECT_EQ(done[1].tokens, plain(b));
  EXPECT_EQ(done[2].tokens, plain(d));
  EXPECT_GT(done[1].drafted, 0);
}

// Sampled speculative decoding has the full model's distribution: over 4,000 seeds, the second
// and third tokens (the first comes from the prefill) are distributed as in plain sampling,
// cell by cell within 5 standard deviations of the difference of two frequencies.
TEST_P(SpeculativeGeneration, SampledTokensFollowTheFullModel) {
  ModelConfig c = ConfigWithExits(GetParam());
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  testing::FillParams(*m, 33, 0.5f);
  const std::vector<int32_t> prompt = testing::RandomTokens(5, c.vocab_size, 34);
  const int n = 4000, batch = 16;
  auto counts = [&](const SpeculativeParams& spec, int position) {
    std::vector<int> count(c.vocab_size);
    Generator g(m.get(), c.max_seq_len, batch);
    for (int first = 0; first < n; first += batch) {
      std::vector<GenerationRequest> reqs(batch, Request(prompt, 3, 0, 4));
      for (int i = 0; i < batch; ++i) {
        reqs[i].sampling.temperature = 1.0f;
        reqs[i].sampling.seed = 1000 + first + i;
        reqs[i].speculative = spec;
      }
      const auto results = g.GenerateBatch(reqs);
      EXPECT_TRUE(results.ok()) << results.status();
      if (!results.ok()) return count;
      for (const GenerationResult& r : *results) ++count[r.tokens.at(position)];
    }
    return count;
  };
  for (int position : {1, 2}) {
    const std::vector<int> plain = counts(SpeculativeParams(), position);
    const std::vector<int> spec = counts({2, 2, 0.0f}, position);
    for (int v = 0; v < c.vocab_size; ++v) {
      const double p = (plain[v] + spec[v]) / (2.0 * n);
      const double sd = std::sqrt(2 * p * (1 - p) / n);
      EXPECT_NEAR(static_cast<double>(spec[v]) / n, static_cast<double>(plain[v]) / n,
                  5 * sd + 1e-9)
          << "token " << v << " at position " << position;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Styles, SpeculativeGeneration,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

TEST(SpeculativeGeneration, ErrorsNameTheBadValue) {
  ModelConfig c = ConfigWithExits(ModelStyle::kLlama);
  auto be = Cpu();
  auto m = *Model::Create(c, be.get());
  Generator g(m.get(), 32);
  auto error = [&](GenerationRequest q) { return std::string(g.Validate(q).message()); };
  const std::vector<int32_t> prompt = {1, 2};
  EXPECT_EQ(error(Request(prompt, 4, 4, 4)),
            "the drafting exit's layer 4 is not the layer of an exit in this model");
  EXPECT_EQ(error(Request(prompt, 4, 2, 0)), "draft tokens must be in [1, 16], got 0");
  EXPECT_EQ(error(Request(prompt, 4, 2, 17)), "draft tokens must be in [1, 16], got 17");
  GenerationRequest unsure = Request(prompt, 4, 2, 4);
  unsure.speculative.min_confidence = 1.5f;
  EXPECT_EQ(error(unsure), "the drafts' confidence floor must be in [0, 1], got 1.5");
  EXPECT_EQ(error(Request(prompt, 4, -1, 4)),
            "the drafting exit's layer must be >= 0 (0: off), got -1");
  GenerationRequest q = Request(prompt, 4, 2, 4);
  q.early_exit.threshold = 0.8f;
  EXPECT_NE(error(q).find("does not combine with early exit (threshold 0.8)"), std::string::npos);
  EXPECT_TRUE(g.Validate(Request(prompt, 4, 2, 4)).ok());
}

}  // namespace
}  // namespace eellm
