// Training samples without replacement, as Megatron-LM's GPT dataset draws them: a token stream
// splits into windows of seq + 1 tokens (window w holds tokens [w * seq, (w + 1) * seq];
// neighbours share one token, the last input's target), and each epoch visits every window
// once, in an order of its own. Sample k of a stream is window Order(k / W)(k % W) of its W
// windows, a pure function of (seed, k): any sample regenerates from its index alone (resume,
// data-parallel slices), and no order table is stored (a keyed bijection of [0, W), so streams
// of billions of windows take no memory).
//
// Blends (several streams by weight, Megatron's --data-path 0.3 a 0.7 b) assign global sample
// i to a stream by a fixed pattern of kBlendPeriod samples that gives each stream its share
// (quotas by largest remainder, each sample to the stream furthest behind its share, as
// Megatron's blending does), so stream d's samples are its own 0, 1, 2, ... in order.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace eellm {

// A bijection of [0, n) chosen by `key`: a balanced Feistel network over the smallest power of
// four at least n (four rounds of splitmix64), walked until the value falls below n (under
// four steps on average).
class IndexPermutation {
 public:
  IndexPermutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;  // requires i < n
  uint64_t size() const { return n_; }

 private:
  uint64_t Feistel(uint64_t x) const;
  uint64_t n_, key_;
  int half_bits_;
  uint64_t half_mask_;
};

// Window of sample k of a stream of `windows` windows (its epoch k / windows), for `seed` and
// the stream's index `part` in a blend (0 alone).
int64_t EpochWindow(uint64_t seed, int part, int64_t windows, int64_t k);

// Windows of seq + 1 tokens in a stream of `tokens` tokens: (tokens - 1) / seq.
inline int64_t WindowsOf(int64_t tokens, int seq) { return tokens > seq ? (tokens - 1) / seq : 0; }

// Which stream of a blend global sample i comes from, and which of that stream's samples it is.
class BlendSchedule {
 public:
  static constexpr int kBlendPeriod = 1 << 16;
  // Positive weights (normalized here). Fails, naming the part, when a weight is below one
  // sample in kBlendPeriod.
  static absl::StatusOr<BlendSchedule> Create(const std::vector<double>& weights);

  // {part, index of the sample within the part}.
  std::pair<int, int64_t> operator()(int64_t i) const;
  // Samples of `part` among global samples [0, n).
  int64_t CountBefore(int part, int64_t n) const;
  // Samples of `part` per period.
  int64_t quota(int part) const { return quota_[part]; }

 private:
  static constexpr int kBlock = 64;  // prefix counts are kept every kBlock pattern entries
  int parts_ = 0;
  std::vector<int64_t> quota_;
  std::vector<int32_t> pattern_;  // [kBlendPeriod]: part of each position
  std::vector<int32_t> prefix_;   // [kBlendPeriod / kBlock][parts]: counts before each block
};

}  // namespace eellm
