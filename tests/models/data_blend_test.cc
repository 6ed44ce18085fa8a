// Blended training data (models/data_blend.h): the "weight prefix" spec, rows drawn by weight as
// whole windows of one part, reproducible per (seed, step) and sliceable by rank, one part exactly
// as that part alone, and the validation blend.
#include "models/data_blend.h"

#include <numeric>

#include "gtest/gtest.h"

namespace eellm {
namespace {

TokenDataset Iota(int n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return TokenDataset(std::move(t));
}

TEST(DataBlendTest, ParsesPrefixesAndWeightedPairs) {
  auto one = ParseDataBlend("data/kjv");
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->size(), 1u);
  EXPECT_EQ((*one)[0].prefix, "data/kjv");
  EXPECT_DOUBLE_EQ((*one)[0].weight, 1.0);
  auto spaced = ParseDataBlend("/my data/kjv");  // a path with a space, no weight
  ASSERT_TRUE(spaced.ok()) << spaced.status();
  ASSERT_EQ(spaced->size(), 1u);
  EXPECT_EQ((*spaced)[0].prefix, "/my data/kjv");
  auto two = ParseDataBlend("  2 /d/a \t  6 /d/b ");
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ((*two)[1].prefix, "/d/b");
  EXPECT_DOUBLE_EQ((*two)[0].weight, 0.25);
  EXPECT_DOUBLE_EQ((*two)[1].weight, 0.75);
  for (const auto& [spec, want] :
       {std::pair<const char*, const char*>{"0.3 a 0.7", "pairs of a weight and a prefix"},
        {"1 a x b", "weight \"x\" of b"},
        {"-1 a 1 b", "weight \"-1\""},
        {"0 a 1 b", "weight \"0\""},
        {"", "expected a prefix"}}) {
    auto r = ParseDataBlend(spec);
    ASSERT_FALSE(r.ok()) << spec;
    EXPECT_NE(r.status().message().find(want), std::string::npos) << r.status();
  }
}

TEST(DataBlendTest, OnePartIsThatPartsRows) {
  const TokenDataset d = Iota(500, 0);
  const BlendedDataset blend = *BlendedDataset::Create({d}, {1.0});
  std::vector<int32_t> a(6 * 16), at(6 * 16), b(6 * 16), bt(6 * 16);
  d.RandomRows(7, 3, 2, 6, 16, a.data(), at.data());
  blend.RandomRows(7, 3, 2, 6, 16, b.data(), bt.data());
  EXPECT_EQ(a, b);
  EXPECT_EQ(at, bt);
}

TEST(DataBlendTest, RowsAreWindowsOfOnePartDrawnByWeight) {
  const BlendedDataset blend =
      *BlendedDataset::Create({Iota(1000, 0), Iota(3000, 100000)}, {1.0, 3.0});
  EXPECT_EQ(blend.size(), 4000);
  const int seq = 8, rows = 64;
  int from_first = 0, total = 0;
  for (int step = 0; step < 50; ++step) {
    std::vector<int32_t> in(rows * seq), tg(rows * seq);
    blend.RandomRows(11, step, 0, rows, seq, in.data(), tg.data());
    for (int r = 0; r < rows; ++r) {
      const int32_t first = in[r * seq];
      const bool a = first < 100000;
      for (int i = 0; i < seq; ++i) {  // a window of consecutive tokens of one part
        ASSERT_EQ(in[r * seq + i], first + i);
        ASSERT_EQ(tg[r * seq + i], first + i + 1);
      }
      EXPECT_LE(first + seq, a ? 1000 - 1 : 103000 - 1);
      from_first += a;
      ++total;
    }
    // Ranks' slices are rows of the whole batch.
    std::vector<int32_t> part(5 * seq), part_tg(5 * seq);
    blend.RandomRows(11, step, 17, 5, seq, part.data(), part_tg.data());
    EXPECT_TRUE(std::equal(part.begin(), part.end(), in.begin() + 17 * seq)) << step;
  }
  // 3,200 rows at weight 1/4: 800 expected, standard deviation about 24.
  EXPECT_NEAR(from_first, total / 4, 100) << from_first << " of " << total;
  // Another step, another batch.
  std::vector<int32_t> x(rows * seq), xt(rows * seq), y(rows * seq), yt(rows * seq);
  blend.RandomRows(11, 1, 0, rows, seq, x.data(), xt.data());
  blend.RandomRows(11, 2, 0, rows, seq, y.data(), yt.data());
  EXPECT_NE(x, y);
}

TEST(DataBlendTest, ValidationTakesEachPartsShare) {
  const TokenDataset a = Iota(1000, 0), b = Iota(1000, 10000), c = Iota(1000, 20000);
  const TokenDataset v = BlendedDataset::BlendValidation({a, b}, {1.0, 1.0}, 10, 10);
  ASSERT_EQ(v.size(), 101);  // 5 windows of each, and the last window's target
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(v.at(i), i);
    EXPECT_EQ(v.at(50 + i), 10000 + i);
  }
  EXPECT_EQ(v.at(100), 10050);
  EXPECT_EQ(v.NumSequentialBatches(10, 10), 1);
  // Exact shares by largest remainder: 2 and 6 of 8; 4, 3, 3 of 10 in thirds.
  const TokenDataset q = BlendedDataset::BlendValidation({a, b}, {1, 3}, 8, 10);
  ASSERT_EQ(q.size(), 81);
  EXPECT_EQ(q.at(19), 19);
  EXPECT_EQ(q.at(20), 10000);
  const TokenDataset t = BlendedDataset::BlendValidation({a, b, c}, {1, 1, 1}, 10, 10);
  ASSERT_EQ(t.size(), 101);
  EXPECT_EQ(t.at(40), 10000);
  EXPECT_EQ(t.at(70), 20000);
  // A part shorter than its share gives its whole windows only: none straddles two parts.
  const TokenDataset shorter = BlendedDataset::BlendValidation({Iota(12, 0), b}, {3, 1}, 10, 10);
  ASSERT_EQ(shorter.size(), 10 + 20 + 1);
  EXPECT_EQ(shorter.at(9), 9);
  EXPECT_EQ(shorter.at(10), 10000);
  EXPECT_EQ(BlendedDataset::BlendValidation({a}, {1.0}, 10, 10).size(), 1000);
}

}  // namespace
}  // namespace eellm
