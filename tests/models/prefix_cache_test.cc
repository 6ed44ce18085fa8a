// Prefix caching: the page pool's bookkeeping (KvPagePool), and generation whose prefills hold
// cached pages (a common prompt prefix, a conversation's previous turn, a preempted sequence)
// against each sequence generated alone and against full passes. Also chunked prefill, whose
// chunks register their pages as they complete.
#include <algorithm>
#include <numeric>
#include <set>

#include "models/generator.h"
#include "models/kv_page_pool.h"
#include "tests/models/full_pass.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::ConfigWithExits;
using testing::Cpu;
using testing::RandomTokens;

std::vector<int32_t> PageOf(int32_t first) {
  std::vector<int32_t> t(KvPagePool::kPageTokens);
  std::iota(t.begin(), t.end(), first);
  return t;
}

TEST(KvPagePool, TakesUnusedPagesFirstThenTheLeastRecentlyReleased) {
  KvPagePool pool(4);
  EXPECT_EQ(pool.free(), 4);
  const int32_t a = pool.Take(), b = pool.Take(a + 1), c = pool.Take(7);
  EXPECT_EQ(std::vector<int32_t>({a, b, c}), std::vector<int32_t>({0, 1, 2}));
  const std::vector<int32_t> t0 = PageOf(0), t1 = PageOf(16), t2 = PageOf(100);
  ASSERT_TRUE(pool.Register(a, -1, t0.data(), true));
  ASSERT_TRUE(pool.Register(b, a, t1.data(), true));
  ASSERT_TRUE(pool.Register(c, -1, t2.data(), true));
  EXPECT_FALSE(pool.Register(pool.Take(), -1, t0.data(), true));  // page 3: a holds them
  EXPECT_EQ(pool.Find(-1, t0.data(), true), a);
  EXPECT_EQ(pool.Find(a, t1.data(), true), b);
  EXPECT_EQ(pool.Find(b, t1.data(), true), -1);
  pool.Release(3);  // unregistered: unused again
  // Registered: cached. In one epoch the deeper page goes first, whatever the calls' order.
  pool.Release(a, /*epoch=*/5, /*position=*/0);
  pool.Release(b, 5, 1);
  pool.Hold(c);  // a second holder
  pool.Release(c);
  EXPECT_EQ(pool.free(), 3);
  EXPECT_EQ(pool.cached(), 2);
  EXPECT_EQ(pool.holders(c), 1);
  EXPECT_EQ(pool.Take(), 3);  // unused before cached
  EXPECT_EQ(pool.Take(), b);  // then the least recently released (deepest), forgotten
  EXPECT_EQ(pool.Find(a, t1.data(), true), -1);
  EXPECT_EQ(pool.Find(-1, t0.data(), true), a);
  EXPECT_EQ(pool.Take(), a);
  EXPECT_EQ(pool.Take(), -1);
  // Page a now holds other tokens; b's old entry (after a's old tokens) must not come back.
  const std::vector<int32_t> other = PageOf(50);
  ASSERT_TRUE(pool.Register(a, -1, other.data(), true));
  ASSERT_TRUE(pool.Register(b, a, t1.data(), false));
  EXPECT_EQ(pool.Find(-1, t0.data(), true), -1);
  EXPECT_EQ(pool.Find(a, t1.data(), false), b);
  EXPECT_EQ(pool.Find(a, t1.data(), true), -1);  // without its block exits' K/V
}

// Tensor-parallel ranks may release the same pages in another order within a pass: the pages
// given back do not depend on it. Earlier epochs go first.
TEST(KvPagePool, EvictionFollowsEpochsAndPositionsNotCallOrder) {
  std::vector<std::vector<int32_t>> taken;
  for (bool reversed : {false, true}) {
    KvPagePool pool(4);
    for (int p = 0; p < 4; ++p) {
      ASSERT_EQ(pool.Take(), p);
      ASSERT_TRUE(pool.Register(p, -1, PageOf(100 * p).data(), true));
    }
    const int64_t epoch[] = {7, 3, 7, 3};
    const int position[] = {0, 2, 4, 1};
    for (int k = 0; k < 4; ++k) {
      const int p = reversed ? 3 - k : k;
      pool.Release(p, epoch[p], position[p]);
    }
    taken.emplace_back();
    for (int k = 0; k < 4; ++k) taken.back().push_back(pool.Take());
  }
  EXPECT_EQ(taken[0], std::vector<int32_t>({1, 3, 2, 0}));
  EXPECT_EQ(taken[1], taken[0]);
}

TEST(KvPagePool, APageWithBlockExitsKvReplacesOneWithout) {
  KvPagePool pool(3);
  const std::vector<int32_t> t = PageOf(3);
  const int32_t a = pool.Take(), b = pool.Take();
  ASSERT_TRUE(pool.Register(a, -1, t.data(), false));
  EXPECT_EQ(pool.Find(-1, t.data(), true), -1);
  ASSERT_TRUE(pool.Register(b, -1, t.data(), true));
  EXPECT_EQ(pool.Find(-1, t.data(), false), b);
  EXPECT_FALSE(pool.registered(a));
  pool.Release(a);  // forgotten: unused, not cached
  EXPECT_EQ(pool.cached(), 0);
  EXPECT_EQ(pool.free(), 2);
}

class PrefixCacheTest : public ::testing::TestWithParam<ModelStyle> {
 protected:
  void SetUp() override {
    c_ = ConfigWithExits(GetParam());  // a block exit at layer 1: its K/V are in the pages too
    c_.max_seq_len = 96;
    be_ = Cpu();
    m_ = *Model::Create(c_, be_.get());
    testing::FillParams(*m_, 101, 0.8f);
    system_ = RandomTokens(40, c_.vocab_size, 7);
  }
  // The common 40-token prefix and `n` tokens of its own.
  GenerationRequest Ask(int n, uint64_t seed, float threshold = 1.0f) const {
    GenerationRequest r;
    r.prompt = system_;
    const std::vector<int32_t> own = RandomTokens(n, c_.vocab_size, seed);
    r.prompt.insert(r.prompt.end(), own.begin(), own.end());
    r.max_new_tokens = 20;
    r.early_exit.threshold = threshold;
    return r;
  }
  // Runs `r` alone on `g`; *pages: the pages it held at admission.
  GenerationResult Run(Generator& g, const GenerationRequest& r, std::vector<int32_t>* pages) {
    auto slot = g.Admit(r);
    EXPECT_TRUE(slot.ok()) << slot.status();
    if (!slot.ok()) return {};
    if (pages != nullptr) *pages = g.kv_pages(*slot);
    GenerationResult out;
    for (bool first = true; g.active() > 0; first = false) {
      for (Generator::Finished& f : g.Advance()) out = std::move(f.result);
      // After the prefill, a full-model sequence's K/V, shared pages included, are a full pass's
      // (up to the rounding of a prefill of other rows).
      if (first && g.active() > 0 && r.early_exit.threshold >= 1 && !r.speculative.enabled()) {
        testing::ExpectCacheMatches(g, *slot, testing::RunFull(*m_, r.prompt), 5e-5);
      }
    }
    return out;
  }
  // `got` is what `r` gets alone, and what full passes give.
  void ExpectAsAlone(const GenerationRequest& r, const GenerationResult& got) {
    Generator alone(m_.get(), c_.max_seq_len);
    const GenerationResult one = (*alone.GenerateBatch({r}))[0];
    EXPECT_EQ(got.tokens, one.tokens);
    EXPECT_EQ(got.exit_index, one.exit_index);
    EXPECT_EQ(got.depth, one.depth);
    ASSERT_EQ(got.logprobs.size(), one.logprobs.size());
    for (size_t t = 0; t < one.logprobs.size(); ++t) {
      EXPECT_NEAR(got.logprobs[t], one.logprobs[t], 1e-4) << "token " << t;
    }
    if (!r.speculative.enabled()) testing::ExpectMatchesFullPass(*m_, r, got);
  }
  std::vector<int32_t> First(const std::vector<int32_t>& pages, int n) const {
    return {pages.begin(), pages.begin() + std::min<size_t>(n, pages.size())};
  }

  ModelConfig c_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<Model> m_;
  std::vector<int32_t> system_;
};

// Requests after the first hold the pages of the 40 tokens they share (2 whole pages), a
// conversation's next turn the pages of the previous turn's prompt and answer; a sequence that
// checks exits only holds pages written with its block exits' K/V. Every sequence gets what it
// gets alone.
TEST_P(PrefixCacheTest, LaterPromptsHoldCachedPagesAndKeepTheirTokens) {
  Generator g(m_.get(), c_.max_seq_len, 4, /*kv_tokens=*/512);
  g.EnablePrefixCaching();
  std::vector<int32_t> first, pages;
  const GenerationRequest greedy = Ask(5, 1);  // 45 tokens
  const GenerationResult a = Run(g, greedy, &first);
  EXPECT_EQ(a.cached_prompt_tokens, 0);
  ExpectAsAlone(greedy, a);
  // Its 4 pages of prompt + answer (64 of the 65 tokens are in the cache) stay cached.
  EXPECT_EQ(g.kv_cached_pages(), 4);
  EXPECT_EQ(g.kv_tokens_in_use(), 0);

  GenerationRequest sampled = Ask(3, 2);
  sampled.sampling.temperature = 0.9f;
  sampled.sampling.seed = 5;
  const GenerationResult b = Run(g, sampled, &pages);
  EXPECT_EQ(b.cached_prompt_tokens, 32);
  EXPECT_EQ(First(pages, 2), First(first, 2));
  ExpectAsAlone(sampled, b);

  // The next turn: the first prompt, its answer and 3 more tokens (68): all 4 pages.
  GenerationRequest turn = greedy;
  turn.prompt.insert(turn.prompt.end(), a.tokens.begin(), a.tokens.end());
  const std::vector<int32_t> more = RandomTokens(3, c_.vocab_size, 3);
  turn.prompt.insert(turn.prompt.end(), more.begin(), more.end());
  turn.max_new_tokens = 12;
  const GenerationResult t = Run(g, turn, &pages);
  EXPECT_EQ(t.cached_prompt_tokens, 64);
  EXPECT_EQ(First(pages, 4), std::vector<int32_t>({0, 1, 2, 3}));  // the first's, as it grew
  ExpectAsAlone(turn, t);

  // Early exit needs the block exit's K/V, which full-model passes did not write. (Its pages are
  // registered once a token that runs every layer completes the rows before it.)
  const GenerationRequest early = Ask(7, 4, 0.8f);
  std::vector<int32_t> early_pages;
  const GenerationResult e = Run(g, early, &early_pages);
  EXPECT_EQ(e.cached_prompt_tokens, 0);
  ExpectAsAlone(early, e);
  const GenerationRequest early2 = Ask(2, 5, 0.9f);
  const GenerationResult e2 = Run(g, early2, &pages);
  EXPECT_EQ(e2.cached_prompt_tokens, 32);
  EXPECT_EQ(First(pages, 2), First(early_pages, 2));
  ExpectAsAlone(early2, e2);
  GenerationRequest spec = Ask(9, 6);
  spec.speculative.exit_layer = c_.exits[1].layer;
  spec.speculative.draft_tokens = 3;
  const GenerationResult s = Run(g, spec, &pages);
  EXPECT_EQ(s.cached_prompt_tokens, 32);
  EXPECT_EQ(First(pages, 2), First(early_pages, 2));
  ExpectAsAlone(spec, s);
  // Pages with the block exit's K/V replaced those without: full-model requests hold them too.
  const GenerationResult a2 = Run(g, greedy, &pages);
  EXPECT_EQ(a2.cached_prompt_tokens, 32);
  EXPECT_EQ(First(pages, 2), First(early_pages, 2));
  ExpectAsAlone(greedy, a2);
  EXPECT_EQ(g.prefix_cached_tokens(), 32 + 64 + 32 + 32 + 32);

  // A prompt to be scored is computed whole: every row's final-head output is wanted.
  GenerationRequest scored = Ask(4, 8);
  scored.prompt_logprobs = true;
  const GenerationResult sc = Run(g, scored, nullptr);
  EXPECT_EQ(sc.cached_prompt_tokens, 0);
  Generator alone(m_.get(), c_.max_seq_len);
  const GenerationResult one = (*alone.GenerateBatch({scored}))[0];
  ASSERT_EQ(sc.prompt_logprobs.size(), one.prompt_logprobs.size());
  for (size_t i = 0; i < one.prompt_logprobs.size(); ++i) {
    EXPECT_NEAR(sc.prompt_logprobs[i], one.prompt_logprobs[i], 1e-4) << "prompt token " << i + 1;
  }
}

// A sequence admitted while another runs holds the pages that one registered once their rows
// ran every layer (not before: the first token exits early, and the prompt's rows wait below
// the deeper layers); shared pages count once in the cache's use. All get what they get alone.
TEST_P(PrefixCacheTest, RunningSequencesSharePages) {
  Generator g(m_.get(), c_.max_seq_len, 3, /*kv_tokens=*/256);
  g.EnablePrefixCaching();
  const GenerationRequest a = Ask(5, 11, 0.6f), b = Ask(6, 12, 0.7f), early = Ask(3, 13, 0.7f);
  ASSERT_TRUE(g.Admit(a, 0).ok());
  g.Advance();
  ASSERT_LT(g.pending_start(0), 32);
  ASSERT_TRUE(g.Admit(early, 2).ok());
  EXPECT_EQ(g.kv_pages(2).size(), 3u);
  EXPECT_EQ(std::min(g.kv_pages(2)[0], g.kv_pages(2)[1]), 3);  // none of a's pages
  while (g.pending_start(0) < 32) g.Advance();
  ASSERT_TRUE(g.Admit(b, 1).ok());
  // The first of a and early whose rows completed registered the pages.
  const std::vector<int32_t> shared = First(g.kv_pages(1), 2);
  EXPECT_TRUE(shared == First(g.kv_pages(0), 2) || shared == First(g.kv_pages(2), 2));
  // Shared pages count once.
  std::set<int32_t> distinct;
  for (int s = 0; s < 3; ++s) distinct.insert(g.kv_pages(s).begin(), g.kv_pages(s).end());
  EXPECT_EQ(g.kv_tokens_in_use(), static_cast<int>(distinct.size()) * 16);
  EXPECT_LT(distinct.size(), g.kv_pages(0).size() + g.kv_pages(1).size() + g.kv_pages(2).size());
  std::vector<GenerationResult> got(3);
  while (g.active() > 0) {
    for (Generator::Finished& f : g.Advance()) got[f.slot] = std::move(f.result);
  }
  EXPECT_EQ(got[1].cached_prompt_tokens, 32);
  EXPECT_EQ(got[2].cached_prompt_tokens, 0);
  ExpectAsAlone(a, got[0]);
  ExpectAsAlone(b, got[1]);
  ExpectAsAlone(early, got[2]);
  EXPECT_EQ(g.kv_tokens_in_use(), 0);
}

// Identical prompts prefilled in one pass each compute their pages; when they register them, the
// second holds the first's instead of its own (freed). Both get what they get alone.
TEST_P(PrefixCacheTest, IdenticalPromptsInOnePassEndUpSharingPages) {
  Generator g(m_.get(), c_.max_seq_len, 2, /*kv_tokens=*/256);
  g.EnablePrefixCaching();
  GenerationRequest a = Ask(5, 41), b = a;
  b.sampling.temperature = 0.9f;
  b.sampling.seed = 8;
  ASSERT_TRUE(g.Admit(a, 0).ok());
  ASSERT_TRUE(g.Admit(b, 1).ok());
  EXPECT_EQ(g.kv_tokens_in_use(), 6 * 16);  // 45 tokens each: 3 pages each, none found
  std::vector<GenerationResult> got(2);
  for (Generator::Finished& f : g.Advance()) got[f.slot] = std::move(f.result);
  EXPECT_EQ(First(g.kv_pages(1), 2), First(g.kv_pages(0), 2));
  EXPECT_EQ(g.kv_tokens_in_use(), 4 * 16);
  while (g.active() > 0) {
    for (Generator::Finished& f : g.Advance()) got[f.slot] = std::move(f.result);
  }
  ExpectAsAlone(a, got[0]);
  ExpectAsAlone(b, got[1]);
}

// A full-model sequence X registers its first page without the block exit's K/V; an early-exit
// sequence Y with the same first 16 tokens computes its own, whose registration replaces X's
// while X still holds it. X's next whole page then follows a page no longer registered: it is
// not registered (nor does anything fail), and both get what they get alone.
TEST_P(PrefixCacheTest, APageReplacedWhileHeldEndsItsHoldersRegistration) {
  Generator g(m_.get(), c_.max_seq_len, 2, /*kv_tokens=*/256);
  g.EnablePrefixCaching();
  GenerationRequest x, y;
  x.prompt.assign(system_.begin(), system_.begin() + 20);
  x.max_new_tokens = 20;
  y.prompt = system_;
  y.max_new_tokens = 20;
  y.early_exit.threshold = 0.9f;
  ASSERT_TRUE(g.Admit(x, 0).ok());
  std::vector<GenerationResult> got(2);
  for (Generator::Finished& f : g.Advance()) got[f.slot] = std::move(f.result);
  ASSERT_TRUE(g.Admit(y, 1).ok());
  EXPECT_NE(g.kv_pages(1)[0], g.kv_pages(0)[0]);  // X's page lacks the block exit's K/V
  while (g.pending_start(1) < 16) g.Advance();
  ASSERT_LT(g.length(0), 32);  // Y's page replaced X's before X filled its second page
  while (g.active() > 0) {
    for (Generator::Finished& f : g.Advance()) got[f.slot] = std::move(f.result);
  }
  ExpectAsAlone(x, got[0]);
  ExpectAsAlone(y, got[1]);
  // Y's pages are the ones found now, by either kind of request.
  GenerationRequest again = y;
  again.early_exit.threshold = 1.0f;
  std::vector<int32_t> pages;
  EXPECT_EQ(Run(g, again, &pages).cached_prompt_tokens, 32);
}

// A pool of 4 pages: a new prompt takes unused pages first, then the least recently released
// cached ones (the tail of the previous sequence); the cached prefix left is still found.
// Preempted sequences resume holding their cached pages; tokens as alone.
TEST_P(PrefixCacheTest, CachedPagesGiveWayAndPreemptedSequencesResumeFromThem) {
  Generator g(m_.get(), c_.max_seq_len, 2, /*kv_tokens=*/64);
  g.EnablePrefixCaching();
  GenerationRequest a = Ask(2, 21);  // 42 + 10 tokens: 4 pages, 3 of them complete
  a.max_new_tokens = 10;
  std::vector<int32_t> pa, pb, pc;
  ExpectAsAlone(a, Run(g, a, &pa));
  EXPECT_EQ(g.kv_cached_pages(), 3);
  GenerationRequest b;  // 20 + 10 other tokens: the unused page, then a's last cached one
  b.prompt = RandomTokens(20, c_.vocab_size, 22);
  b.max_new_tokens = 10;
  ExpectAsAlone(b, Run(g, b, &pb));
  const GenerationResult again = Run(g, a, &pc);
  EXPECT_EQ(again.cached_prompt_tokens, 32);
  EXPECT_EQ(First(pc, 2), First(pa, 2));
  ExpectAsAlone(a, again);

  // Two sequences of 42 + 20 tokens in 4 pages: the latest admitted is preempted as the first
  // grows, and resumes from the pages both share and those it registered.
  Generator h(m_.get(), c_.max_seq_len, 2, /*kv_tokens=*/64);
  h.EnablePrefixCaching();
  std::vector<GenerationRequest> reqs = {Ask(2, 31), Ask(2, 32)};
  reqs[1].sampling.temperature = 0.8f;
  reqs[1].sampling.seed = 3;
  for (GenerationRequest& r : reqs) r.max_new_tokens = 20;
  const std::vector<GenerationResult> got = *h.GenerateBatch(reqs);
  EXPECT_GE(h.preemptions(), 1);
  EXPECT_GT(h.prefix_cached_tokens(), 0);
  for (size_t i = 0; i < reqs.size(); ++i) ExpectAsAlone(reqs[i], got[i]);
}

// Chunked prefill, 10 prompt rows per pass for all prefilling sequences together, in admission
// order: the first sequence's 45-token prompt takes passes 1-5, then it decodes a token every
// pass while the others' prompts (47, 49 and 43 tokens) go on in chunks. Each sequence gets what
// it gets alone: greedy, early exit, speculative and sampled.
TEST_P(PrefixCacheTest, ChunkedPrefillInterleavesPromptsWithDecoding) {
  Generator g(m_.get(), c_.max_seq_len, 4, /*kv_tokens=*/512);
  g.SetPrefillChunk(10);
  std::vector<GenerationRequest> reqs = {Ask(5, 51), Ask(7, 52, 0.8f), Ask(9, 53), Ask(3, 54)};
  reqs[2].speculative.exit_layer = c_.exits[1].layer;
  reqs[2].speculative.draft_tokens = 3;
  reqs[3].sampling.temperature = 0.9f;
  reqs[3].sampling.seed = 2;
  for (const GenerationRequest& r : reqs) ASSERT_TRUE(g.Admit(r).ok());
  std::vector<int> first_token_pass(4, -1), tokens_by_pass_10(4, 0);
  std::vector<GenerationResult> got(4);
  for (int pass = 1; g.active() > 0; ++pass) {
    auto each = [&](int slot, int32_t) {
      if (first_token_pass[slot] < 0) first_token_pass[slot] = pass;
      if (pass <= 10) ++tokens_by_pass_10[slot];
    };
    for (Generator::Finished& f : g.Advance(each)) got[f.slot] = std::move(f.result);
  }
  EXPECT_EQ(first_token_pass, std::vector<int>({5, 10, 15, 19}));
  EXPECT_EQ(tokens_by_pass_10[0], 6);  // passes 5-10
  for (int i = 0; i < 4; ++i) ExpectAsAlone(reqs[i], got[i]);

  // With prefix caching, each chunk's whole pages are registered as it completes: a prompt
  // admitted while the first is still prefilling holds the page its first chunk wrote.
  Generator h(m_.get(), c_.max_seq_len, 2, /*kv_tokens=*/512);
  h.SetPrefillChunk(16);
  h.EnablePrefixCaching();
  ASSERT_TRUE(h.Admit(reqs[0], 0).ok());
  h.Advance();
  EXPECT_EQ(h.length(0), 16);
  ASSERT_TRUE(h.Admit(reqs[3], 1).ok());
  EXPECT_EQ(h.kv_pages(1)[0], h.kv_pages(0)[0]);
  EXPECT_EQ(h.length(1), 16);
  std::vector<GenerationResult> both(2);
  while (h.active() > 0) {
    for (Generator::Finished& f : h.Advance()) both[f.slot] = std::move(f.result);
  }
  EXPECT_EQ(both[1].cached_prompt_tokens, 16);
  ExpectAsAlone(reqs[0], both[0]);
  ExpectAsAlone(reqs[3], both[1]);
}

// Prompts to be scored go in chunks too: each chunk scores its own rows. The log-probabilities
// and top tokens of every prompt token, and the tokens generated after, are those of a whole
// prefill, for a prompt scored only and one that then generates beside a decoding sequence.
TEST_P(PrefixCacheTest, ChunkedPrefillScoresPromptsChunkByChunk) {
  Generator g(m_.get(), c_.max_seq_len, 3, /*kv_tokens=*/512);
  g.SetPrefillChunk(7);
  std::vector<GenerationRequest> reqs = {Ask(5, 61), Ask(8, 62, 0.8f), Ask(2, 63)};
  reqs[0].prompt_logprobs = true;
  reqs[0].top_logprobs = 2;
  reqs[1].prompt_logprobs = true;
  reqs[2].max_new_tokens = 0;
  reqs[2].prompt_logprobs = true;
  const std::vector<GenerationResult> got = *g.GenerateBatch(reqs);
  Generator alone(m_.get(), c_.max_seq_len);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const GenerationResult one = (*alone.GenerateBatch({reqs[i]}))[0];
    ASSERT_EQ(got[i].prompt_logprobs.size(), reqs[i].prompt.size() - 1) << "request " << i;
    for (size_t p = 0; p < one.prompt_logprobs.size(); ++p) {
      EXPECT_NEAR(got[i].prompt_logprobs[p], one.prompt_logprobs[p], 1e-4) << i << " token " << p;
    }
    ASSERT_EQ(got[i].prompt_top.size(), one.prompt_top.size()) << "request " << i;
    for (size_t p = 0; p < one.prompt_top.size(); ++p) {
      ASSERT_EQ(got[i].prompt_top[p].size(), one.prompt_top[p].size());
      for (size_t k = 0; k < one.prompt_top[p].size(); ++k) {
        EXPECT_EQ(got[i].prompt_top[p][k].first, one.prompt_top[p][k].first) << i << " " << p;
        EXPECT_NEAR(got[i].prompt_top[p][k].second, one.prompt_top[p][k].second, 1e-4);
      }
    }
    EXPECT_EQ(got[i].tokens, one.tokens) << "request " << i;
    EXPECT_EQ(got[i].exit_index, one.exit_index) << "request " << i;
  }
  EXPECT_GE(g.passes(), 45 / 7);
}

INSTANTIATE_TEST_SUITE_P(Styles, PrefixCacheTest,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

}  // namespace
}  // namespace eellm
