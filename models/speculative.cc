#include "models/speculative.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/core/status.h"

namespace eellm {

std::vector<double> TokenDistribution(const float* logits, int vocab, const SamplingParams& p) {
  std::vector<double> dist(vocab, 0.0);
  if (p.temperature <= 0.0f) {
    dist[std::max_element(logits, logits + vocab) - logits] = 1.0;
    return dist;
  }
  const double mx = *std::max_element(logits, logits + vocab);
  if (p.top_k <= 0 && p.top_p >= 1.0f) {  // no truncation: the whole softmax, no sorting
    double sum = 0;
    for (int i = 0; i < vocab; ++i) sum += dist[i] = std::exp((logits[i] - mx) / p.temperature);
    for (double& d : dist) d /= sum;
    return dist;
  }
  const Candidates c = SamplingCandidates(logits, vocab, p);  // as SampleToken draws
  for (size_t i = 0; i < c.ids.size(); ++i) dist[c.ids[i]] = c.weights[i] / c.sum;
  return dist;
}

int32_t SampleFrom(const std::vector<double>& dist, Rng& rng) {
  double u = rng.Uniform();
  int32_t last = -1;
  for (size_t i = 0; i < dist.size(); ++i) {
    if (dist[i] <= 0) continue;
    last = static_cast<int32_t>(i);
    u -= dist[i];
    if (u < 0) return last;
  }
  EE_CHECK(last >= 0, "SampleFrom: a distribution without mass");
  return last;
}

DraftVerdict VerifyDraft(const std::vector<double>& p, const std::vector<double>& q, int32_t draft,
                         Rng& rng) {
  EE_CHECK(p.size() == q.size() && draft >= 0 && static_cast<size_t>(draft) < p.size(),
           "VerifyDraft: draft ", draft, " of distributions over ", p.size(), " and ", q.size(),
           " tokens");
  const double pd = p[draft], qd = q[draft];
  // q(d) > 0 since d was drawn from q; p(d) >= q(d) always accepts (no draw, so greedy and
  // agreeing heads leave the generator's random stream alone).
  if (pd >= qd || rng.Uniform() * qd < pd) return {true, draft};
  std::vector<double> rest(p.size());
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += rest[i] = std::max(0.0, p[i] - q[i]);
  if (!(sum > 0)) return {false, SampleFrom(p, rng)};  // p and q equal up to rounding
  for (double& r : rest) r /= sum;
  return {false, SampleFrom(rest, rng)};
}

}  // namespace eellm
