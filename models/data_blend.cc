#include "models/data_blend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"

namespace eellm {

absl::StatusOr<std::vector<BlendPart>> ParseDataBlend(const std::string& spec) {
  const std::vector<std::string> items =
      absl::StrSplit(spec, absl::ByAnyChar(" \t\n"), absl::SkipWhitespace());
  double first = 0;
  // One prefix: one item, or a path with spaces (not starting with a weight).
  if (items.size() == 1 || (items.size() > 1 && !absl::SimpleAtod(items[0], &first))) {
    return std::vector<BlendPart>{{1.0, items.size() == 1 ? items[0] : spec}};
  }
  if (items.empty() || items.size() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("train data \"", spec,
                     "\": expected a prefix, or pairs of a weight and a prefix (\"0.3 a 0.7 b\")"));
  }
  std::vector<BlendPart> parts;
  double sum = 0;
  for (size_t i = 0; i < items.size(); i += 2) {
    double w = 0;
    if (!absl::SimpleAtod(items[i], &w) || !(w > 0) || !std::isfinite(w)) {
      return absl::InvalidArgumentError(absl::StrCat("train data \"", spec, "\": weight \"",
                                                     items[i], "\" of ", items[i + 1],
                                                     " is not a positive number"));
    }
    parts.push_back({w, items[i + 1]});
    sum += w;
  }
  for (BlendPart& p : parts) p.weight /= sum;
  return parts;
}

absl::StatusOr<BlendedDataset> BlendedDataset::Create(std::vector<TokenDataset> parts,
                                                      std::vector<double> weights, bool epochs) {
  EE_CHECK(!parts.empty() && weights.size() == parts.size(), "a blend of ", parts.size(),
           " parts and ", weights.size(), " weights");
  std::optional<BlendSchedule> schedule;
  if (epochs && parts.size() > 1) {
    ASSIGN_OR_RETURN(schedule, BlendSchedule::Create(weights));
  }
  return BlendedDataset(std::move(parts), std::move(weights), std::move(schedule));
}

BlendedDataset::BlendedDataset(std::vector<TokenDataset> parts, std::vector<double> weights,
                               std::optional<BlendSchedule> schedule)
    : parts_(std::move(parts)), schedule_(std::move(schedule)) {
  double sum = 0;
  for (double w : weights) sum += w;
  double acc = 0;
  for (double w : weights) cumulative_.push_back((acc += w) / sum);
  cumulative_.back() = 1.0;
}

int64_t BlendedDataset::size() const {
  int64_t n = 0;
  for (const TokenDataset& p : parts_) n += p.size();
  return n;
}

void BlendedDataset::RandomRows(uint64_t seed, int64_t step, int64_t first_row, int rows, int seq,
                                int32_t* inputs, int32_t* targets) const {
  if (parts_.size() == 1) {
    parts_[0].RandomRows(seed, step, first_row, rows, seq, inputs, targets);
    return;
  }
  EE_CHECK(rows > 0 && first_row >= 0, "rows ", rows, ", first_row ", first_row);
  // A generator of its own (the seed mixed once more): not the one-part rows' stream.
  Rng rng(SplitMix64(SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(step))));
  for (int64_t r = 0; r < 2 * first_row; ++r) rng.Next();
  for (int r = 0; r < rows; ++r) {
    const double u = static_cast<double>(rng.Next() >> 11) * 0x1.0p-53;  // [0, 1)
    const size_t part =
        std::upper_bound(cumulative_.begin(), cumulative_.end(), u) - cumulative_.begin();
    const TokenDataset& d = parts_[std::min(part, parts_.size() - 1)];
    EE_CHECK(d.size() > seq, "blend part of ", d.size(), " tokens, seq ", seq);
    const int64_t offset = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(d.size() - seq)));
    d.CopyWindow(offset, seq, inputs + static_cast<int64_t>(r) * seq,
                 targets + static_cast<int64_t>(r) * seq);
  }
}

std::pair<int, int64_t> BlendedDataset::EpochPartWindow(uint64_t seed, int64_t i, int seq) const {
  const auto [d, k] = parts_.size() == 1 ? std::pair<int, int64_t>{0, i} : (*schedule_)(i);
  const int64_t windows = WindowsOf(parts_[d].size(), seq);
  EE_CHECK(windows > 0, "blend part of ", parts_[d].size(), " tokens, seq ", seq);
  return {d, EpochWindow(seed, d, windows, k)};
}

void BlendedDataset::EpochRows(uint64_t seed, int64_t first_sample, int rows, int seq,
                               int32_t* inputs, int32_t* targets) const {
  EE_CHECK(parts_.size() == 1 || schedule_.has_value(),
           "EpochRows of a blend created without epochs");
  EE_CHECK(rows > 0 && first_sample >= 0 && seq > 0, "rows ", rows, ", first sample ", first_sample,
           ", seq ", seq);
  for (int r = 0; r < rows; ++r) {
    const auto [d, w] = EpochPartWindow(seed, first_sample + r, seq);
    parts_[d].CopyWindow(w * seq, seq, inputs + static_cast<int64_t>(r) * seq,
                         targets + static_cast<int64_t>(r) * seq);
  }
}

void BlendedDataset::EpochWindowIds(uint64_t seed, int64_t first_sample, int rows, int seq,
                                    int64_t* windows) const {
  EE_CHECK(parts_.size() == 1 || schedule_.has_value(),
           "EpochWindowIds of a blend created without epochs");
  std::vector<int64_t> first(parts_.size(), 0);  // each part's first window number
  for (size_t d = 1; d < parts_.size(); ++d) {
    first[d] = first[d - 1] + WindowsOf(parts_[d - 1].size(), seq);
  }
  for (int r = 0; r < rows; ++r) {
    const auto [d, w] = EpochPartWindow(seed, first_sample + r, seq);
    windows[r] = first[d] + w;
  }
}

int64_t BlendedDataset::Windows(int seq) const {
  int64_t n = 0;
  for (const TokenDataset& p : parts_) n += WindowsOf(p.size(), seq);
  return n;
}

double BlendedDataset::EpochsOf(int d, int64_t samples, int seq) const {
  EE_CHECK(parts_.size() == 1 || schedule_.has_value(), "EpochsOf a blend created without epochs");
  const int64_t k = parts_.size() == 1 ? samples : schedule_->CountBefore(d, samples);
  return static_cast<double>(k) / static_cast<double>(WindowsOf(parts_[d].size(), seq));
}

TokenDataset BlendedDataset::BlendValidation(const std::vector<TokenDataset>& vals,
                                             const std::vector<double>& weights, int64_t windows,
                                             int seq) {
  EE_CHECK(!vals.empty() && vals.size() == weights.size() && seq > 0 && windows >= 0,
           "validation blend of ", vals.size(), " parts");
  if (vals.size() == 1) return vals[0];
  double sum = 0;
  for (double w : weights) sum += w;
  // The windows shared by weight, largest remainders first, so that they add up exactly.
  std::vector<int64_t> share(vals.size());
  std::vector<std::pair<double, size_t>> remainders;
  int64_t given = 0;
  for (size_t i = 0; i < vals.size(); ++i) {
    const double exact = weights[i] / sum * static_cast<double>(windows);
    share[i] = static_cast<int64_t>(std::floor(exact));
    given += share[i];
    remainders.push_back({share[i] - exact, i});  // most negative: largest remainder
  }
  std::sort(remainders.begin(), remainders.end());
  for (size_t k = 0; given < windows; ++k, ++given) ++share[remainders[k % vals.size()].second];
  std::vector<int32_t> blend;
  for (size_t i = 0; i < vals.size(); ++i) {
    // Whole windows of the part (as many as it has): none straddles two parts.
    const int64_t take = std::min(share[i], vals[i].size() / seq) * seq;
    for (int64_t k = 0; k < take; ++k) blend.push_back(vals[i].at(k));
    // The last window's target: the part's next token (the next part's first otherwise).
    if (i + 1 == vals.size() && take > 0 && take < vals[i].size()) {
      blend.push_back(vals[i].at(take));
    }
  }
  // (Without a token to spare in the last part its last window has no target and is not used.)
  return TokenDataset(std::move(blend));
}

}  // namespace eellm
