// The epoch sampler (models/epoch_sampler.h): keyed permutations are bijections of any size and
// differ by key, an epoch of samples takes every window of a stream exactly once (a fresh order
// in the next epoch), rows are slices of the global sample sequence, and a blend gives each part
// its share with the part's own samples in order.
#include "models/epoch_sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "gtest/gtest.h"
#include "models/data_blend.h"

namespace eellm {
namespace {

TokenDataset Iota(int n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return TokenDataset(std::move(t));
}

TEST(IndexPermutationTest, IsABijectionOfAnySizeAndDependsOnItsKey) {
  for (uint64_t n : {1, 2, 3, 5, 16, 17, 255, 1000, 4097}) {
    for (uint64_t key : {0ull, 1ull, 0x9e3779b97f4a7c15ull}) {
      const IndexPermutation p(n, key);
      std::vector<uint64_t> seen(n, 0);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t j = p(i);
        ASSERT_LT(j, n) << n;
        ++seen[j];
      }
      EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<long>(n)) << n;
    }
  }
  // A shuffle: few fixed points or consecutive runs, and another key gives another order.
  const IndexPermutation a(1000, 7), b(1000, 8);
  int fixed = 0, runs = 0, same = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    fixed += a(i) == i;
    if (i + 1 < 1000) runs += a(i + 1) == a(i) + 1;
    same += a(i) == b(i);
  }
  EXPECT_LT(fixed, 10);
  EXPECT_LT(runs, 10);
  EXPECT_LT(same, 10);
}

TEST(EpochSamplerTest, AnEpochTakesEveryWindowOnceInAFreshOrder) {
  const int seq = 8;
  const TokenDataset d = Iota(1001, 0);  // (1001 - 1) / 8 = 125 windows
  const BlendedDataset data = *BlendedDataset::Create({d}, {1.0});
  const int64_t windows = WindowsOf(d.size(), seq);
  ASSERT_EQ(windows, 125);
  std::vector<int32_t> in(2 * windows * seq), tg(2 * windows * seq);
  data.EpochRows(5, 0, 2 * windows, seq, in.data(), tg.data());
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::vector<int> inputs_seen(1001, 0);
    for (int64_t r = epoch * windows; r < (epoch + 1) * windows; ++r) {
      const int32_t first = in[r * seq];
      ASSERT_EQ(first % seq, 0) << r;  // a window's start
      for (int i = 0; i < seq; ++i) {
        ASSERT_EQ(in[r * seq + i], first + i);
        ASSERT_EQ(tg[r * seq + i], first + i + 1);
        ++inputs_seen[first + i];
      }
    }
    // Every token but the last (a target only) is an input exactly once per epoch.
    EXPECT_EQ(std::count(inputs_seen.begin(), inputs_seen.begin() + 1000, 1), 1000) << epoch;
  }
  // The two epochs' orders differ, and the order is not the stream's.
  int same = 0, in_order = 0;
  for (int64_t r = 0; r < windows; ++r) {
    same += in[r * seq] == in[(r + windows) * seq];
    in_order += in[r * seq] == r * seq;
  }
  EXPECT_LT(same, 10);
  EXPECT_LT(in_order, 10);
  // Any slice of the sample sequence is those rows (data-parallel ranks, resume), and another
  // seed gives another order.
  std::vector<int32_t> part(7 * seq), part_tg(7 * seq);
  data.EpochRows(5, 120, 7, seq, part.data(), part_tg.data());
  EXPECT_TRUE(std::equal(part.begin(), part.end(), in.begin() + 120 * seq));
  EXPECT_TRUE(std::equal(part_tg.begin(), part_tg.end(), tg.begin() + 120 * seq));
  data.EpochRows(6, 120, 7, seq, part.data(), part_tg.data());
  EXPECT_FALSE(std::equal(part.begin(), part.end(), in.begin() + 120 * seq));
  EXPECT_DOUBLE_EQ(data.EpochsOf(0, 250, seq), 2.0);
  EXPECT_DOUBLE_EQ(data.EpochsOf(0, 25, seq), 0.2);
}

TEST(BlendScheduleTest, EachPartGetsItsShareWithItsSamplesInOrder) {
  const std::vector<double> weights = {0.2, 0.5, 0.3};
  const BlendSchedule s = *BlendSchedule::Create(weights);
  const int64_t n = 2 * BlendSchedule::kBlendPeriod + 300;
  std::vector<int64_t> count(3, 0);
  for (int64_t i = 0; i < n; ++i) {
    const auto [d, k] = s(i);
    ASSERT_EQ(k, count[d]) << i;  // the part's own samples, in order
    ++count[d];
    if (i % 997 == 0 || i + 1 == n) {
      for (int p = 0; p < 3; ++p) {
        ASSERT_EQ(s.CountBefore(p, i + 1), count[p]) << i;
        // The greedy pattern stays within a sample or two of each share.
        const double share =
            static_cast<double>(s.quota(p)) / BlendSchedule::kBlendPeriod * (i + 1);
        EXPECT_LT(std::abs(count[p] - share), 2.0) << i << " part " << p;
      }
    }
  }
  EXPECT_EQ(s.quota(0) + s.quota(1) + s.quota(2), BlendSchedule::kBlendPeriod);
  EXPECT_NEAR(static_cast<double>(s.quota(1)) / BlendSchedule::kBlendPeriod, 0.5, 1e-4);
  // A part too small for the pattern is named.
  auto tiny = BlendSchedule::Create({1.0, 1e-6});
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.status().message().find("part 2's weight"), std::string::npos) << tiny.status();
  // Random windows need no pattern: such a blend is fine for them.
  EXPECT_TRUE(BlendedDataset::Create({Iota(100, 0), Iota(100, 0)}, {1.0, 1e-6}, false).ok());
  EXPECT_FALSE(BlendedDataset::Create({Iota(100, 0), Iota(100, 0)}, {1.0, 1e-6}, true).ok());
}

TEST(EpochSamplerTest, ABlendWalksEachPartsEpochs) {
  const int seq = 4;
  const BlendedDataset data =
      *BlendedDataset::Create({Iota(41, 0), Iota(121, 100000)}, {1.0, 1.0});  // 10 and 30 windows
  const int rows = 60;  // 30 samples of each part: 3 epochs of the first, 1 of the second
  std::vector<int32_t> in(rows * seq), tg(rows * seq);
  data.EpochRows(3, 0, rows, seq, in.data(), tg.data());
  std::vector<std::vector<int32_t>> starts(2);
  for (int r = 0; r < rows; ++r) starts[in[r * seq] >= 100000].push_back(in[r * seq]);
  ASSERT_EQ(starts[0].size(), 30u);
  ASSERT_EQ(starts[1].size(), 30u);
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::set<int32_t> windows(starts[0].begin() + 10 * epoch, starts[0].begin() + 10 * epoch + 10);
    EXPECT_EQ(windows.size(), 10u) << epoch;
  }
  EXPECT_EQ(std::set<int32_t>(starts[1].begin(), starts[1].end()).size(), 30u);
  EXPECT_NEAR(data.EpochsOf(0, rows, seq), 3.0, 1e-9);
  EXPECT_NEAR(data.EpochsOf(1, rows, seq), 1.0, 1e-9);
}

// EpochWindowIds names the window EpochRows reads, numbered over the blend: part 0's 10 windows
// are 0-9 and part 1's 30 are 10-39 (window w of a part starts at its token w * seq).
TEST(EpochSamplerTest, WindowIdsNameTheWindowsRead) {
  const int seq = 4;
  const BlendedDataset data = *BlendedDataset::Create({Iota(41, 0), Iota(121, 100000)}, {1.0, 1.0});
  EXPECT_EQ(data.Windows(seq), 40);
  const int rows = 80, first = 7;
  std::vector<int32_t> in(rows * seq), tg(rows * seq);
  std::vector<int64_t> ids(rows);
  data.EpochRows(3, first, rows, seq, in.data(), tg.data());
  data.EpochWindowIds(3, first, rows, seq, ids.data());
  for (int r = 0; r < rows; ++r) {
    const int32_t start = in[r * seq];
    const int64_t want = start >= 100000 ? 10 + (start - 100000) / seq : start / seq;
    EXPECT_EQ(ids[r], want) << "row " << r;
  }
  // One part: its own windows.
  const BlendedDataset one = *BlendedDataset::Create({Iota(41, 0)}, {1.0});
  one.EpochRows(5, 3, 12, seq, in.data(), tg.data());
  one.EpochWindowIds(5, 3, 12, seq, ids.data());
  for (int r = 0; r < 12; ++r) EXPECT_EQ(ids[r], in[r * seq] / seq) << "row " << r;
}

}  // namespace
}  // namespace eellm
