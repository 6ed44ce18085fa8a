#include "models/sampler.h"

#include <algorithm>
#include <cmath>
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

int32_t SampleToken(std::vector<float>& logits, const SamplingParams& p, Rng& rng) {
  const int v = static_cast<int>(logits.size());
  if (p.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<int> idx(v);
  std::iota(idx.begin(), idx.end(), 0);
  // Stable order by descending logit (ties by index) keeps sampling reproducible.
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  int keep = v;
  if (p.top_k > 0) keep = std::min(keep, p.top_k);
  std::vector<double> prob(keep);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += prob[i] = std::exp((logits[idx[i]] - mx) / p.temperature);
  if (p.top_p < 1.0f) {
    double cum = 0;
    int k = 0;
    while (k < keep) {
      cum += prob[k++] / sum;
      if (cum >= p.top_p) break;
    }
    keep = k;
    sum = 0;
    for (int i = 0; i < keep; ++i) sum += prob[i];
  }
  double u = rng.Uniform() * sum;
  for (int i = 0; i < keep; ++i) {
    u -= prob[i];
    if (u <= 0) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace eellm
