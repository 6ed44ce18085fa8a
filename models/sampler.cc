#include "models/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace eellm {

float MaxProbability(const float* logits, int vocab, float temperature) {
  float mx = logits[0];
  for (int i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp((logits[i] - mx) / temperature);
  return static_cast<float>(1.0 / sum);
}

float LogProbability(const float* logits, int vocab, int32_t token) {
  float mx = logits[0];
  for (int i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(logits[i] - mx);
  return static_cast<float>(logits[token] - mx - std::log(sum));
}

TopTokens TopLogProbabilities(const float* logits, int vocab, int k) {
  k = std::min(k, vocab);
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  // Tokens without probability (logit -inf: ids past the tokenizer) are not listed.
  while (k > 0 && logits[idx[k - 1]] == -std::numeric_limits<float>::infinity()) --k;
  float mx = logits[0];
  for (int i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(logits[i] - mx);
  const double log_sum = std::log(sum);
  TopTokens top(k);
  for (int i = 0; i < k; ++i) {
    top[i] = {idx[i], static_cast<float>(logits[idx[i]] - mx - log_sum)};
  }
  return top;
}

Candidates SamplingCandidates(const float* logits, int vocab, const SamplingParams& p) {
  Candidates c;
  c.ids.resize(vocab);
  std::iota(c.ids.begin(), c.ids.end(), 0);
  int keep = p.top_k > 0 ? std::min(vocab, p.top_k) : vocab;
  // Only the top_k need ordering when there is no nucleus to measure.
  std::partial_sort(c.ids.begin(), c.ids.begin() + (p.top_p < 1.0f ? vocab : keep), c.ids.end(),
                    [&](int32_t a, int32_t b) {
                      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
                    });
  c.weights.resize(keep);
  const double mx = logits[c.ids[0]];
  for (int i = 0; i < keep; ++i) {
    c.sum += c.weights[i] = std::exp((logits[c.ids[i]] - mx) / p.temperature);
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    int k = 0;
    while (k < keep) {
      cum += c.weights[k++] / c.sum;
      if (cum >= p.top_p) break;
    }
    keep = k;
    c.sum = 0;
    for (int i = 0; i < keep; ++i) c.sum += c.weights[i];
  }
  c.ids.resize(keep);
  c.weights.resize(keep);
  return c;
}

int32_t SampleToken(std::vector<float>& logits, const SamplingParams& p, Rng& rng) {
  const int v = static_cast<int>(logits.size());
  if (p.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const Candidates c = SamplingCandidates(logits.data(), v, p);
  double u = rng.Uniform() * c.sum;
  size_t last = 0;  // the last candidate with a probability (where rounding leaves u > 0)
  for (size_t i = 0; i < c.ids.size(); ++i) {
    if (c.weights[i] > 0) last = i;
    u -= c.weights[i];
    if (u <= 0 && c.weights[i] > 0) return c.ids[i];
  }
  return c.ids[last];
}

}  // namespace eellm
