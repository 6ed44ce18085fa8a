#include "models/epoch_sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"

namespace eellm {

IndexPermutation::IndexPermutation(uint64_t n, uint64_t key) : n_(n), key_(key) {
  EE_CHECK(n > 0, "a permutation of ", n, " indices");
  int bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) bits += 2;
  half_bits_ = bits / 2;
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
}

uint64_t IndexPermutation::Feistel(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (uint64_t round = 0; round < 4; ++round) {
    const uint64_t f = SplitMix64(key_ ^ SplitMix64((round << 56) ^ right)) & half_mask_;
    const uint64_t next = left ^ f;
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t IndexPermutation::operator()(uint64_t i) const {
  EE_CHECK(i < n_, "index ", i, " of a permutation of ", n_);
  // A bijection of [0, 4^half) restricted to [0, n): follow the cycle out of the range.
  uint64_t x = Feistel(i);
  while (x >= n_) x = Feistel(x);
  return x;
}

int64_t EpochWindow(uint64_t seed, int part, int64_t windows, int64_t k) {
  EE_CHECK(windows > 0 && k >= 0, "sample ", k, " of ", windows, " windows");
  const uint64_t epoch = static_cast<uint64_t>(k / windows);
  const uint64_t key =
      SplitMix64(SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(part)) ^ epoch);
  return static_cast<int64_t>(
      IndexPermutation(static_cast<uint64_t>(windows), key)(static_cast<uint64_t>(k % windows)));
}

absl::StatusOr<BlendSchedule> BlendSchedule::Create(const std::vector<double>& weights) {
  EE_CHECK(!weights.empty(), "a blend without parts");
  double sum = 0;
  for (double w : weights) {
    EE_CHECK(w > 0 && std::isfinite(w), "blend weight ", w);
    sum += w;
  }
  BlendSchedule s;
  s.parts_ = static_cast<int>(weights.size());
  // Quotas per period by largest remainder, so that they add up to the period exactly.
  s.quota_.resize(weights.size());
  std::vector<std::pair<double, int>> remainders;
  int64_t given = 0;
  for (int d = 0; d < s.parts_; ++d) {
    const double exact = weights[d] / sum * kBlendPeriod;
    s.quota_[d] = static_cast<int64_t>(std::floor(exact));
    given += s.quota_[d];
    remainders.push_back({s.quota_[d] - exact, d});
  }
  std::sort(remainders.begin(), remainders.end());
  for (size_t k = 0; given < kBlendPeriod; ++k, ++given) ++s.quota_[remainders[k].second];
  for (int d = 0; d < s.parts_; ++d) {
    if (s.quota_[d] == 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("part %d's weight %g is below one sample in %d of the blend", d + 1,
                          weights[d] / sum, kBlendPeriod));
    }
  }
  // Each position goes to the part furthest behind its share (error quota * (i + 1) - period *
  // count, ties to the lower part). The errors stay above -period and add up to 0, so after the
  // period every part has exactly its quota (checked).
  s.pattern_.resize(kBlendPeriod);
  s.prefix_.assign(static_cast<size_t>(kBlendPeriod / kBlock) * s.parts_, 0);
  std::vector<int64_t> count(s.parts_, 0);
  for (int64_t i = 0; i < kBlendPeriod; ++i) {
    if (i % kBlock == 0) {
      for (int d = 0; d < s.parts_; ++d) {
        s.prefix_[static_cast<size_t>(i / kBlock) * s.parts_ + d] = static_cast<int32_t>(count[d]);
      }
    }
    int best = 0;
    int64_t best_error = 0;
    for (int d = 0; d < s.parts_; ++d) {
      const int64_t error = s.quota_[d] * (i + 1) - int64_t{kBlendPeriod} * count[d];
      if (d == 0 || error > best_error) {
        best = d;
        best_error = error;
      }
    }
    s.pattern_[i] = best;
    ++count[best];
  }
  for (int d = 0; d < s.parts_; ++d) {
    EE_CHECK(count[d] == s.quota_[d], "blend part ", d, ": ", count[d], " of quota ", s.quota_[d]);
  }
  return s;
}

int64_t BlendSchedule::CountBefore(int part, int64_t n) const {
  EE_CHECK(part >= 0 && part < parts_ && n >= 0, "part ", part, ", samples ", n);
  const int64_t r = n % kBlendPeriod;
  int64_t count =
      (n / kBlendPeriod) * quota_[part] + prefix_[static_cast<size_t>(r / kBlock) * parts_ + part];
  for (int64_t i = r / kBlock * kBlock; i < r; ++i) count += pattern_[i] == part;
  return count;
}

std::pair<int, int64_t> BlendSchedule::operator()(int64_t i) const {
  EE_CHECK(i >= 0, "sample ", i);
  const int part = pattern_[i % kBlendPeriod];
  return {part, CountBefore(part, i)};
}

}  // namespace eellm
