// SelfCommunicator and ParallelContext::Single without MPI (the conformance cases run in the
// MPI suite, communicator_test.cc), and AbortAllRanks outside MPI.
#include "parallel/comm/self_communicator.h"

#include <gtest/gtest.h>

#include <vector>

#include "engine/backend.h"
#include "parallel/comm/mpi_runtime.h"
#include "parallel/parallel_context.h"

namespace eellm {
namespace {

TEST(SelfCommunicatorTest, CollectivesOfOneRank) {
  SelfCommunicator c;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.name(), "self");
  std::vector<float> x = {1, -2, 3};
  c.AllReduce(x.data(), 3, ReduceOp::kSum);
  c.IAllReduce(x.data(), 3, ReduceOp::kMax)->Wait();
  EXPECT_EQ(x, (std::vector<float>{1, -2, 3}));
  std::vector<float> y(3, 0);
  c.AllGather(x.data(), y.data(), 3);
  EXPECT_EQ(y, x);
  std::vector<float> z(3, 0);
  c.ReduceScatter(x.data(), z.data(), 3, ReduceOp::kSum);
  EXPECT_EQ(z, x);
  char bytes[4] = {'a', 'b', 'c', 'd'};
  c.Broadcast(bytes, 4, 0);
  EXPECT_EQ(bytes[3], 'd');
  c.Barrier();
  auto sub = c.Subgroup({0});
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->name(), "self");
}

TEST(SelfCommunicatorTest, CopiesWithTheBackend) {
  auto be = MakeBackend("cpu").value();
  float* a = static_cast<float*>(be->Alloc(4 * sizeof(float)));
  float* b = static_cast<float*>(be->Alloc(4 * sizeof(float)));
  const float host[4] = {1, 2, 3, 4};
  be->CopyFromHost(a, host, sizeof(host));
  SelfCommunicator c(be.get());
  c.AllGather(a, b, 4);
  float back[4] = {};
  be->CopyToHost(back, b, sizeof(back));
  EXPECT_EQ(std::vector<float>(back, back + 4), std::vector<float>(host, host + 4));
  be->Free(a);
  be->Free(b);
}

TEST(SelfCommunicatorDeathTest, PointToPointAborts) {
  SelfCommunicator c;
  char byte = 0;
  EXPECT_EXIT(c.Send(&byte, 1, 0, 5), ::testing::ExitedWithCode(1),
              "error: SelfCommunicator::Send\\(peer 0, tag 5\\).*no peer");
  EXPECT_EXIT(c.Recv(&byte, 1, 0, 5), ::testing::ExitedWithCode(1), "SelfCommunicator::Recv");
  EXPECT_EXIT(c.ISend(&byte, 1, 1, 0), ::testing::ExitedWithCode(1), "SelfCommunicator::ISend");
  EXPECT_EXIT(c.IRecv(&byte, 1, 0, 0), ::testing::ExitedWithCode(1), "SelfCommunicator::IRecv");
}

TEST(SelfCommunicatorDeathTest, BadRootOrGroupAborts) {
  SelfCommunicator c;
  char byte = 0;
  EXPECT_EXIT(c.Broadcast(&byte, 1, 1), ::testing::ExitedWithCode(1), "root 1");
  EXPECT_EXIT(c.Subgroup({0, 1}), ::testing::ExitedWithCode(1),
              "Subgroup\\(\\[0, 1\\]\\).*only group");
}

TEST(AbortAllRanksDeathTest, WithoutMpiExitsWithTheCode) {
  EXPECT_FALSE(MpiRuntime::Active());
  EXPECT_EXIT(AbortAllRanks("boom at step 3", 7), ::testing::ExitedWithCode(7),
              "^error: boom at step 3\n$");
  EXPECT_EXIT(AbortAllRanks("zero", 0), ::testing::ExitedWithCode(1), "error: zero");
}

TEST(ParallelContextTest, Single) {
  auto ctx = ParallelContext::Single();
  EXPECT_EQ(ctx->rank, 0);
  EXPECT_EQ(ctx->grid.world(), 1);
  EXPECT_TRUE(ctx->is_first_stage());
  EXPECT_TRUE(ctx->is_last_stage());
  for (Communicator* c :
       {ctx->world.get(), ctx->tp.get(), ctx->dp.get(), ctx->pp.get(), ctx->embedding.get()}) {
    ASSERT_NE(c, nullptr);
    EXPECT_EQ(c->size(), 1);
    EXPECT_EQ(c->rank(), 0);
  }
}

TEST(ParallelContextTest, CreateOnASelfWorld) {
  auto be = MakeBackend("cpu").value();
  auto made = ParallelContext::Create(std::make_unique<SelfCommunicator>(be.get()), 1, 1, 1);
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_EQ((*made)->tp->size(), 1);
  ASSERT_NE((*made)->embedding, nullptr);

  auto bad = ParallelContext::Create(std::make_unique<SelfCommunicator>(), 2, 1, 1);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("world size 1"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace eellm
