// Training data blended from several token streams by weight, as Megatron-LM blends datasets
// (--data-path 0.3 /data/a 0.7 /data/b): train.data may be one prefix or "weight prefix" pairs.
// Training samples come in epochs (models/epoch_sampler.h: each stream's windows once per epoch,
// the streams interleaved by weight), or drawn at random (each row its stream by weight, then a
// window at a random offset in it); the validation stream takes from each part's validation
// split a share by weight.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "models/epoch_sampler.h"
#include "models/token_dataset.h"

namespace eellm {

struct BlendPart {
  double weight = 1.0;  // normalized: the parts' weights sum to 1
  std::string prefix;
};

// "prefix" (one part; also a path with spaces that does not start with a number), or
// "w1 prefix1 w2 prefix2 ..." with positive weights (normalized). Errors name the spec and the
// bad item.
absl::StatusOr<std::vector<BlendPart>> ParseDataBlend(const std::string& spec);

class BlendedDataset {
 public:
  // `parts` and `weights` (positive, normalized here) of the same length, at least one.
  // `epochs`: EpochRows will be used; fails when a weight is too small for the epoch sampler's
  // blend pattern (BlendSchedule).
  static absl::StatusOr<BlendedDataset> Create(std::vector<TokenDataset> parts,
                                               std::vector<double> weights, bool epochs = true);

  int num_parts() const { return static_cast<int>(parts_.size()); }
  const TokenDataset& part(int d) const { return parts_[d]; }

  int64_t size() const;  // tokens of every part

  // As TokenDataset::RandomRows, a pure function of (seed, step): with one part, exactly that
  // part's rows; with several, row r takes two draws of the step's generator (r-th pair), the
  // first picking the part by weight, the second its window's offset in it.
  void RandomRows(uint64_t seed, int64_t step, int64_t first_row, int rows, int seq,
                  int32_t* inputs, int32_t* targets) const;

  // Global samples [first_sample, first_sample + rows) of the epoch sampler
  // (models/epoch_sampler.h), a pure function of (seed, sample index): sample i of a blend is
  // sample k of part d (BlendSchedule), which is window EpochWindow(seed, d, windows of d, k).
  void EpochRows(uint64_t seed, int64_t first_sample, int rows, int seq, int32_t* inputs,
                 int32_t* targets) const;
  // Which window EpochRows reads for each of those samples, numbered over the whole blend (part
  // d's windows after the earlier parts'): in [0, Windows(seq)); equal numbers, equal rows.
  void EpochWindowIds(uint64_t seed, int64_t first_sample, int rows, int seq,
                      int64_t* windows) const;
  int64_t Windows(int seq) const;  // the parts' windows of seq + 1 tokens, summed
  // Epochs of part d that global samples [0, samples) take (fractional).
  double EpochsOf(int d, int64_t samples, int seq) const;

  // A validation stream of `windows` windows of `seq` tokens (and the last one's target): the
  // windows shared among the parts by weight (largest remainders), each part's first whole
  // windows of its stream in `vals` (fewer when it has fewer), one part after the other. One
  // part: that part's stream itself.
  static TokenDataset BlendValidation(const std::vector<TokenDataset>& vals,
                                      const std::vector<double>& weights, int64_t windows, int seq);

 private:
  BlendedDataset(std::vector<TokenDataset> parts, std::vector<double> weights,
                 std::optional<BlendSchedule> schedule);
  // The part global sample i of the epoch sampler reads, and its window there.
  std::pair<int, int64_t> EpochPartWindow(uint64_t seed, int64_t i, int seq) const;
  std::vector<TokenDataset> parts_;
  std::vector<double> cumulative_;         // cumulative weights, the last one 1
  std::optional<BlendSchedule> schedule_;  // for EpochRows of several parts
};

}  // namespace eellm
