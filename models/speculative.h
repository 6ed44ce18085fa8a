// Self-speculative decoding with an early exit as the draft model: the exit drafts a few tokens
// (the first layers only), then one pass of the full model checks them all and keeps the drafts
// it agrees with, plus one token of its own. The output has the full model's distribution
// (greedy: exactly its tokens), unlike early exit, which emits what the exit says.
//
// Here: the request's settings and the acceptance rule (speculative sampling: accept a draft d
// with probability min(1, p(d) / q(d)), else sample from max(0, p - q) renormalised; p = full
// model, q = exit, both after temperature / top-k / top-p). The rounds themselves run in
// Generator (models/generator_speculative.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/core/rng.h"
#include "models/sampler.h"

namespace eellm {

struct SpeculativeParams {
  int exit_layer = 0;    // layer of the exit that drafts; 0: off
  int draft_tokens = 4;  // tokens drafted per round (fewer near max_new_tokens)
  // A draft whose exit confidence (max probability at the exit's temperature, as early exit
  // measures it) is below this ends the round there; 0: every round drafts draft_tokens.
  float min_confidence = 0.0f;
  bool enabled() const { return exit_layer > 0; }
};

inline constexpr int kMaxDraftTokens = 16;

// The distribution SampleToken samples from: softmax(logits / temperature) restricted to the
// top_k tokens and then to the top_p nucleus, renormalised; greedy (temperature 0): all mass on
// the first largest logit. [vocab], sums to 1.
std::vector<double> TokenDistribution(const float* logits, int vocab, const SamplingParams& p);

// A token drawn from `dist` (sums to ~1); the last token with mass if rounding runs past it.
int32_t SampleFrom(const std::vector<double>& dist, Rng& rng);

struct DraftVerdict {
  bool accepted = false;
  int32_t token = 0;  // the draft when accepted, else the full model's replacement
};

// Checks `draft` (drawn from q) against the full model's p. The token returned is distributed
// as p whatever q is. Greedy (one-hot p and q): accepted iff the draft is p's token.
DraftVerdict VerifyDraft(const std::vector<double>& p, const std::vector<double>& q, int32_t draft,
                         Rng& rng);

}  // namespace eellm
