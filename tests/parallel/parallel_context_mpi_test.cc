// ParallelContext under MPI: for every (tp, pp, dp) layout of the world size, the groups have
// the sizes, ranks and members RankGrid prescribes (Megatron order), and a layout that does not
// fit fails alike on every rank. Also checks DetectLaunch against the real mpirun environment.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "parallel/topology.h"
#include "tests/parallel/mpi_test_util.h"

namespace eellm {
namespace {

using testing::World;

struct Layout {
  int tp, pp, dp;
};

// Every (tp, pp, dp) with tp * pp * dp == world.
std::vector<Layout> LayoutsOf(int world) {
  std::vector<Layout> out;
  for (int tp = 1; tp <= world; ++tp) {
    for (int pp = 1; tp * pp <= world; ++pp) {
      if (world % (tp * pp) == 0) out.push_back({tp, pp, world / (tp * pp)});
    }
  }
  return out;
}

// The world ranks of `group`'s members in group-rank order (gathered over the group itself).
std::vector<int> Members(Communicator& group, int world_rank) {
  std::vector<float> all(group.size());
  const float mine = static_cast<float>(world_rank);
  group.AllGather(&mine, all.data(), 1);
  return std::vector<int>(all.begin(), all.end());
}

void CheckGroup(Communicator* group, const std::vector<int>& want, int world_rank,
                const char* what) {
  ASSERT_NE(group, nullptr) << what;
  const int index =
      static_cast<int>(std::find(want.begin(), want.end(), world_rank) - want.begin());
  EXPECT_EQ(group->size(), static_cast<int>(want.size())) << what;
  EXPECT_EQ(group->rank(), index) << what;
  EXPECT_EQ(Members(*group, world_rank), want) << what;
  // A reduction within the group sums exactly its members.
  float sum = static_cast<float>(world_rank), want_sum = 0;
  for (int q : want) want_sum += q;
  group->AllReduce(&sum, 1, ReduceOp::kSum);
  EXPECT_EQ(sum, want_sum) << what;
}

TEST(ParallelContextMpi, EveryLayoutOfTheWorld) {
  const int wr = World().rank, ws = World().size;
  const std::vector<Layout> layouts = LayoutsOf(ws);
  ASSERT_FALSE(layouts.empty());
  for (const Layout& l : layouts) {
    SCOPED_TRACE(absl::StrCat("tp ", l.tp, " pp ", l.pp, " dp ", l.dp, " on rank ", wr));
    auto made = ParallelContext::Create(MpiCommunicator::World(nullptr), l.tp, l.pp, l.dp);
    ASSERT_TRUE(made.ok()) << made.status();
    ParallelContext& ctx = **made;
    const RankGrid& g = ctx.grid;
    EXPECT_EQ(g.tp(), l.tp);
    EXPECT_EQ(g.pp(), l.pp);
    EXPECT_EQ(g.dp(), l.dp);
    EXPECT_EQ(ctx.rank, wr);
    EXPECT_EQ(ctx.world->rank(), wr);
    EXPECT_EQ(ctx.world->size(), ws);
    // Megatron order: tensor-parallel rank fastest, then data-parallel, then stage.
    EXPECT_EQ(ctx.coord.tp, wr % l.tp);
    EXPECT_EQ(ctx.coord.dp, (wr / l.tp) % l.dp);
    EXPECT_EQ(ctx.coord.pp, wr / (l.tp * l.dp));
    CheckGroup(ctx.tp.get(), g.TpGroup(wr), wr, "tp group");
    CheckGroup(ctx.dp.get(), g.DpGroup(wr), wr, "dp group");
    CheckGroup(ctx.pp.get(), g.PpGroup(wr), wr, "pp group");
    EXPECT_EQ(ctx.tp->rank(), ctx.coord.tp);
    EXPECT_EQ(ctx.dp->rank(), ctx.coord.dp);
    EXPECT_EQ(ctx.pp->rank(), ctx.coord.pp);
    EXPECT_EQ(ctx.is_first_stage(), ctx.coord.pp == 0);
    EXPECT_EQ(ctx.is_last_stage(), ctx.coord.pp == l.pp - 1);
    if (ctx.is_first_stage() || ctx.is_last_stage()) {
      // First and last stage of this rank's pipeline (just the rank itself when pp == 1).
      const std::vector<int> emb = g.EmbeddingGroup(wr);
      GridCoord first = ctx.coord, last = ctx.coord;
      first.pp = 0;
      last.pp = l.pp - 1;
      EXPECT_EQ(emb.front(), g.RankOf(first));
      EXPECT_EQ(emb.back(), g.RankOf(last));
      EXPECT_EQ(emb.size(), l.pp == 1 ? 1u : 2u);
      CheckGroup(ctx.embedding.get(), emb, wr, "embedding group");
    } else {
      EXPECT_EQ(ctx.embedding, nullptr) << "a middle stage holds no embedding";
    }
  }
}

// The layouts named in the design, where they fit: (2,2,2) on 8 ranks, (2,1,2) on 4.
TEST(ParallelContextMpi, NamedLayouts) {
  const int wr = World().rank, ws = World().size;
  if (ws != 8 && ws != 4) GTEST_SKIP() << "needs 4 or 8 ranks";
  const Layout l = ws == 8 ? Layout{2, 2, 2} : Layout{2, 1, 2};
  auto made = ParallelContext::Create(MpiCommunicator::World(nullptr), l.tp, l.pp, l.dp);
  ASSERT_TRUE(made.ok()) << made.status();
  ParallelContext& ctx = **made;
  if (ws == 8) {
    // rank = tp + 2 * (dp + 2 * pp)
    const std::vector<std::vector<int>> tp = {{0, 1}, {0, 1}, {2, 3}, {2, 3},
                                              {4, 5}, {4, 5}, {6, 7}, {6, 7}};
    const std::vector<std::vector<int>> dp = {{0, 2}, {1, 3}, {0, 2}, {1, 3},
                                              {4, 6}, {5, 7}, {4, 6}, {5, 7}};
    const std::vector<std::vector<int>> pp = {{0, 4}, {1, 5}, {2, 6}, {3, 7},
                                              {0, 4}, {1, 5}, {2, 6}, {3, 7}};
    EXPECT_EQ(Members(*ctx.tp, wr), tp[wr]);
    EXPECT_EQ(Members(*ctx.dp, wr), dp[wr]);
    EXPECT_EQ(Members(*ctx.pp, wr), pp[wr]);
    ASSERT_NE(ctx.embedding, nullptr);
    EXPECT_EQ(Members(*ctx.embedding, wr), pp[wr]);  // two stages: first and last
  } else {
    const std::vector<std::vector<int>> tp = {{0, 1}, {0, 1}, {2, 3}, {2, 3}};
    const std::vector<std::vector<int>> dp = {{0, 2}, {1, 3}, {0, 2}, {1, 3}};
    EXPECT_EQ(Members(*ctx.tp, wr), tp[wr]);
    EXPECT_EQ(Members(*ctx.dp, wr), dp[wr]);
    EXPECT_EQ(Members(*ctx.pp, wr), std::vector<int>{wr});
    ASSERT_NE(ctx.embedding, nullptr);
    EXPECT_EQ(Members(*ctx.embedding, wr), std::vector<int>{wr});
  }
}

TEST(ParallelContextMpi, MiddleStagesHaveNoEmbeddingGroup) {
  const int wr = World().rank, ws = World().size;
  if (ws < 4) GTEST_SKIP() << "needs 4 stages";
  auto made = ParallelContext::Create(MpiCommunicator::World(nullptr), 1, ws, 1);
  ASSERT_TRUE(made.ok()) << made.status();
  ParallelContext& ctx = **made;
  if (wr == 0 || wr == ws - 1) {
    ASSERT_NE(ctx.embedding, nullptr);
    EXPECT_EQ(Members(*ctx.embedding, wr), (std::vector<int>{0, ws - 1}));
  } else {
    EXPECT_EQ(ctx.embedding, nullptr);
  }
}

TEST(ParallelContextMpi, LayoutThatDoesNotFitFailsOnEveryRank) {
  const int ws = World().size;
  auto made = ParallelContext::Create(MpiCommunicator::World(nullptr), 3, 1, ws);
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(made.status().message().find(absl::StrCat("world size ", ws)), std::string::npos)
      << made.status();
  EXPECT_NE(made.status().message().find(absl::StrCat("= ", 3 * ws)), std::string::npos)
      << made.status();
  auto zero = ParallelContext::Create(MpiCommunicator::World(nullptr), 0, 1, ws);
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find(">= 1"), std::string::npos) << zero.status();
  // The world communicator still works afterwards (no rank was left inside a split).
  auto world = MpiCommunicator::World(nullptr);
  float one = 1;
  world->AllReduce(&one, 1, ReduceOp::kSum);
  EXPECT_EQ(one, static_cast<float>(ws));
}

TEST(ParallelContextMpi, DetectLaunchUnderMpirun) {
  auto info = DetectLaunch();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->launcher, "mpirun");
  EXPECT_EQ(info->rank, World().rank);
  EXPECT_EQ(info->world, World().size);
  EXPECT_GE(info->local_rank, 0);
  EXPECT_LT(info->local_rank, World().size);
}

}  // namespace
}  // namespace eellm
