// RankGrid arithmetic (Megatron order, groups, round trips for every layout up to 8 ranks)
// and DetectLaunch's reading of the mpirun / Slurm environment.
#include "parallel/topology.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "tests/scoped_env.h"

namespace eellm {
namespace {

struct Layout {
  int tp, pp, dp;
};

std::vector<Layout> LayoutsUpTo(int max_world) {
  std::vector<Layout> out;
  for (int tp = 1; tp <= max_world; ++tp) {
    for (int pp = 1; tp * pp <= max_world; ++pp) {
      for (int dp = 1; tp * pp * dp <= max_world; ++dp) out.push_back({tp, pp, dp});
    }
  }
  return out;
}

TEST(RankGridTest, CreateChecksSizes) {
  auto ok = RankGrid::Create(2, 2, 2, 8);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->world(), 8);

  auto bad = RankGrid::Create(2, 2, 2, 6);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("world size 6"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("2 * 2 * 2 = 8"), std::string::npos) << bad.status();

  auto zero = RankGrid::Create(1, 0, 1, 0);
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find("pp 0"), std::string::npos) << zero.status();
  EXPECT_FALSE(RankGrid::Create(-1, -1, 1, 1).ok());
}

// Every layout up to 8 ranks: coordinates round-trip, follow the Megatron order, and the
// groups partition the ranks along each axis.
TEST(RankGridTest, EveryLayoutUpTo8Ranks) {
  const std::vector<Layout> layouts = LayoutsUpTo(8);
  EXPECT_EQ(layouts.size(), 38u);  // ordered factorisations into three of w = 1..8
  for (const Layout& l : layouts) {
    const int world = l.tp * l.pp * l.dp;
    SCOPED_TRACE(::testing::Message() << "tp " << l.tp << " pp " << l.pp << " dp " << l.dp);
    auto made = RankGrid::Create(l.tp, l.pp, l.dp, world);
    ASSERT_TRUE(made.ok()) << made.status();
    const RankGrid& g = *made;
    std::set<std::vector<int>> tp_groups, dp_groups, pp_groups;
    for (int r = 0; r < world; ++r) {
      const GridCoord c = g.CoordOf(r);
      EXPECT_EQ(r, c.tp + l.tp * (c.dp + l.dp * c.pp));  // Megatron order
      EXPECT_EQ(g.RankOf(c), r);
      ASSERT_GE(c.tp, 0);
      ASSERT_LT(c.tp, l.tp);
      ASSERT_GE(c.dp, 0);
      ASSERT_LT(c.dp, l.dp);
      ASSERT_GE(c.pp, 0);
      ASSERT_LT(c.pp, l.pp);

      const std::vector<int> tp = g.TpGroup(r), dp = g.DpGroup(r), pp = g.PpGroup(r);
      ASSERT_EQ(tp.size(), static_cast<size_t>(l.tp));
      ASSERT_EQ(dp.size(), static_cast<size_t>(l.dp));
      ASSERT_EQ(pp.size(), static_cast<size_t>(l.pp));
      EXPECT_EQ(tp[c.tp], r);  // group rank = coordinate along the axis
      EXPECT_EQ(dp[c.dp], r);
      EXPECT_EQ(pp[c.pp], r);
      for (int i = 0; i < l.tp; ++i) {
        const GridCoord m = g.CoordOf(tp[i]);
        EXPECT_TRUE(m.tp == i && m.dp == c.dp && m.pp == c.pp);
      }
      for (int i = 0; i < l.dp; ++i) {
        const GridCoord m = g.CoordOf(dp[i]);
        EXPECT_TRUE(m.tp == c.tp && m.dp == i && m.pp == c.pp);
      }
      for (int i = 0; i < l.pp; ++i) {
        const GridCoord m = g.CoordOf(pp[i]);
        EXPECT_TRUE(m.tp == c.tp && m.dp == c.dp && m.pp == i);
      }
      // Tensor-parallel groups are contiguous ranks.
      EXPECT_EQ(tp.back() - tp.front(), l.tp - 1);
      tp_groups.insert(tp);
      dp_groups.insert(dp);
      pp_groups.insert(pp);

      // Embedding group: first and last stage of this pipeline.
      const std::vector<int> emb = g.EmbeddingGroup(r);
      if (l.pp == 1) {
        EXPECT_EQ(emb, std::vector<int>{r});
      } else {
        EXPECT_EQ(emb, (std::vector<int>{pp.front(), pp.back()}));
      }
    }
    // Groups partition the world: world / size groups along each axis.
    EXPECT_EQ(tp_groups.size(), static_cast<size_t>(world / l.tp));
    EXPECT_EQ(dp_groups.size(), static_cast<size_t>(world / l.dp));
    EXPECT_EQ(pp_groups.size(), static_cast<size_t>(world / l.pp));
    for (int tp = 0; tp < l.tp; ++tp) {
      for (int dp = 0; dp < l.dp; ++dp) {
        for (int pp = 0; pp < l.pp; ++pp) {
          GridCoord c;
          c.tp = tp;
          c.dp = dp;
          c.pp = pp;
          EXPECT_EQ(g.CoordOf(g.RankOf(c)), c);
        }
      }
    }
  }
}

TEST(RankGridTest, MegatronExample) {
  // tp = 2, pp = 2, dp = 2 (Megatron's 8-GPU example): rank = tp + 2 * (dp + 2 * pp).
  const RankGrid g = RankGrid::Create(2, 2, 2, 8).value();
  const GridCoord c5 = g.CoordOf(5);
  EXPECT_EQ(c5.tp, 1);
  EXPECT_EQ(c5.dp, 0);
  EXPECT_EQ(c5.pp, 1);
  EXPECT_EQ(g.TpGroup(5), (std::vector<int>{4, 5}));
  EXPECT_EQ(g.DpGroup(5), (std::vector<int>{5, 7}));
  EXPECT_EQ(g.PpGroup(5), (std::vector<int>{1, 5}));
  EXPECT_EQ(g.EmbeddingGroup(5), (std::vector<int>{1, 5}));
  EXPECT_EQ(g.EmbeddingGroup(2), (std::vector<int>{2, 6}));

  // tp = 2, pp = 4, dp = 1: stages 0..3 of pipeline tp-rank 1 are ranks 1, 3, 5, 7.
  const RankGrid h = RankGrid::Create(2, 4, 1, 8).value();
  EXPECT_EQ(h.PpGroup(3), (std::vector<int>{1, 3, 5, 7}));
  EXPECT_EQ(h.EmbeddingGroup(3), (std::vector<int>{1, 7}));  // rank 3 is a middle stage
  EXPECT_EQ(h.DpGroup(3), std::vector<int>{3});
}

// DetectLaunch, with the launcher variables of this process removed for each test and restored
// after it.
class DetectLaunchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v :
         {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
          "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}) {
      cleared_.push_back(std::make_unique<testing::ScopedEnv>(v, nullptr));
    }
  }
  // (A launcher variable: the scope above restores it.)
  static void Set(const char* name, const char* value) { setenv(name, value, 1); }

  std::vector<std::unique_ptr<testing::ScopedEnv>> cleared_;
};

TEST_F(DetectLaunchTest, NoLauncherIsASingleProcess) {
  auto info = DetectLaunch();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->launcher, "single");
  EXPECT_EQ(info->rank, 0);
  EXPECT_EQ(info->world, 1);
  EXPECT_EQ(info->local_rank, 0);
}

TEST_F(DetectLaunchTest, OpenMpi) {
  Set("OMPI_COMM_WORLD_RANK", "5");
  Set("OMPI_COMM_WORLD_SIZE", "8");
  Set("OMPI_COMM_WORLD_LOCAL_RANK", "1");
  auto info = DetectLaunch();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->launcher, "mpirun");
  EXPECT_EQ(info->rank, 5);
  EXPECT_EQ(info->world, 8);
  EXPECT_EQ(info->local_rank, 1);
}

TEST_F(DetectLaunchTest, Slurm) {
  Set("SLURM_PROCID", "3");
  Set("SLURM_NTASKS", "4");
  Set("SLURM_LOCALID", "3");
  auto info = DetectLaunch();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->launcher, "slurm");
  EXPECT_EQ(info->rank, 3);
  EXPECT_EQ(info->world, 4);
  EXPECT_EQ(info->local_rank, 3);
}

TEST_F(DetectLaunchTest, MpirunInsideASlurmAllocationWins) {
  Set("SLURM_PROCID", "0");
  Set("SLURM_NTASKS", "1");
  Set("OMPI_COMM_WORLD_RANK", "2");
  Set("OMPI_COMM_WORLD_SIZE", "4");
  auto info = DetectLaunch();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->launcher, "mpirun");
  EXPECT_EQ(info->rank, 2);
  EXPECT_EQ(info->world, 4);
  EXPECT_EQ(info->local_rank, 0);  // absent local rank
}

TEST_F(DetectLaunchTest, MalformedValuesNameTheVariable) {
  struct Case {
    const char* name;
    const char* value;
  };
  const Case cases[] = {{"OMPI_COMM_WORLD_RANK", "x"},
                        {"OMPI_COMM_WORLD_SIZE", "8 ranks"},
                        {"OMPI_COMM_WORLD_LOCAL_RANK", "-1"},
                        {"SLURM_PROCID", ""},
                        {"SLURM_NTASKS", "-2"},
                        {"SLURM_LOCALID", "1.5"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    TearDown();
    SetUp();
    // Valid values for the rest of the same launcher, then the malformed one.
    const bool ompi = std::string(c.name).rfind("OMPI", 0) == 0;
    Set(ompi ? "OMPI_COMM_WORLD_RANK" : "SLURM_PROCID", "0");
    Set(ompi ? "OMPI_COMM_WORLD_SIZE" : "SLURM_NTASKS", "2");
    Set(ompi ? "OMPI_COMM_WORLD_LOCAL_RANK" : "SLURM_LOCALID", "0");
    Set(c.name, c.value);
    auto info = DetectLaunch();
    ASSERT_FALSE(info.ok());
    EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(info.status().message().find(c.name), std::string::npos) << info.status();
    EXPECT_NE(info.status().message().find(std::string("\"") + c.value + "\""), std::string::npos)
        << info.status();
  }
}

TEST_F(DetectLaunchTest, RankNeedsALargerWorld) {
  Set("OMPI_COMM_WORLD_RANK", "4");
  Set("OMPI_COMM_WORLD_SIZE", "4");
  auto info = DetectLaunch();
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("OMPI_COMM_WORLD_SIZE"), std::string::npos)
      << info.status();

  unsetenv("OMPI_COMM_WORLD_SIZE");
  info = DetectLaunch();
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("OMPI_COMM_WORLD_SIZE"), std::string::npos)
      << info.status();

  Set("OMPI_COMM_WORLD_SIZE", "0");
  Set("OMPI_COMM_WORLD_RANK", "0");
  EXPECT_FALSE(DetectLaunch().ok());
}

}  // namespace
}  // namespace eellm
