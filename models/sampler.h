// Next-token sampling on the host: greedy, temperature, top-k and top-p (nucleus) with a seeded
// generator; and the softmax confidence used for early exits.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/core/rng.h"

namespace eellm {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int top_k = 0;             // 0 = no limit
  float top_p = 1.0f;        // 1 = no limit
  uint64_t seed = 1234;
};

// Picks a token from logits[vocab] (the vector is used as scratch).
int32_t SampleToken(std::vector<float>& logits, const SamplingParams& p, Rng& rng);

// The tokens SampleToken draws among (temperature > 0), most likely first (ties: lower id): the
// top_k, then the top_p nucleus; with their weights exp((logit - max) / temperature) and the
// weights' sum.
struct Candidates {
  std::vector<int32_t> ids;
  std::vector<double> weights;
  double sum = 0;
};
Candidates SamplingCandidates(const float* logits, int vocab, const SamplingParams& p);

// Max softmax probability of logits / temperature.
float MaxProbability(const float* logits, int vocab, float temperature);

// log softmax(logits)[token].
float LogProbability(const float* logits, int vocab, int32_t token);

// The k most likely tokens with their log softmax(logits), most likely first (ties: lower id);
// tokens of logit -inf are left out.
using TopTokens = std::vector<std::pair<int32_t, float>>;
TopTokens TopLogProbabilities(const float* logits, int vocab, int k);

}  // namespace eellm
