// Generation under tensor parallelism, under mpirun: the world is one tensor-parallel group. Rank
// 0 saves a single-rank model; every rank loads its shard of that checkpoint and generates a
// batch of four sequences with early exit (mixed prompt lengths, thresholds, allowed exits and
// sampling). Each rank gets the single-rank model's tokens, exits and depths: the heads'
// vocabulary shards are gathered, so the ranks agree; tensor parallelism only reorders fp32
// sums, so log-probabilities agree within 1e-4.
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "launch/model_loader.h"
#include "models/generator.h"
#include "parallel/comm/mpi_communicator.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

// Exits (after layers 1, 2 and 3): a tied norm exit, a block exit (its own attention heads split
// over the ranks, its own KV cache) and an MLP exit.
ModelConfig TpGenerationConfig(ModelStyle style) {
  ModelConfig c;
  c.style = style;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.num_heads = 8;
  c.num_kv_heads = style == ModelStyle::kLlama ? 2 : 8;
  c.ffn_hidden_size = 48;
  c.max_seq_len = 32;
  c.tie_embeddings = style == ModelStyle::kGpt;
  ExitConfig a, b, d;
  a.layer = 1;
  a.kind = ExitKind::kNorm;
  a.tied = true;
  b.layer = 2;
  b.kind = ExitKind::kBlock;
  d.layer = 3;
  d.kind = ExitKind::kMlp;
  c.exits = {a, b, d};
  return c;
}

class TpGeneration : public ::testing::TestWithParam<ModelStyle> {};

TEST_P(TpGeneration, EveryRankGeneratesWhatTheWholeModelGenerates) {
  auto world = MpiCommunicator::World(nullptr);
  const int tp = world->size(), rank = world->rank();
  const ModelConfig c = TpGenerationConfig(GetParam());
  if (!SplitsOverTp(c, tp)) GTEST_SKIP() << "the test model does not split over " << tp;
  auto be = std::move(*MakeBackend("cpu"));
  auto whole = *Model::Create(c, be.get());
  testing::FillParams(*whole, 17, 0.5f);
  int pid = getpid();
  world->Broadcast(&pid, sizeof(pid), 0);
  const std::string file = "/tmp/eellm_tp_generation_" + std::to_string(pid) + "_" +
                           std::to_string(GetParam() == ModelStyle::kGpt) + ".h5";
  if (rank == 0) {
    CheckpointMeta meta;
    meta.config_json = c.ToJson();
    ASSERT_TRUE(SaveCheckpoint(file, whole->params(), meta).ok());
  }
  world->Barrier();
  auto part = LoadModelFromCheckpoint(file, be.get(), false, TpSpec{rank, tp, world.get()});
  world->Barrier();
  if (rank == 0) std::remove(file.c_str());
  ASSERT_TRUE(part.ok()) << part.status();
  const std::vector<GenerationRequest> reqs = testing::MixedRequests(c);
  Generator gw(whole.get(), 32, 4), gp(part->model.get(), 32, 4);
  auto want = *gw.GenerateBatch(reqs);
  auto got = *gp.GenerateBatch(reqs);
  int early = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank << " of " << tp << ", sequence " << i);
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].exit_index, want[i].exit_index);
    EXPECT_EQ(got[i].depth, want[i].depth);
    ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size());
    for (size_t t = 0; t < got[i].logprobs.size(); ++t) {
      EXPECT_NEAR(got[i].logprobs[t], want[i].logprobs[t], 1e-4) << "token " << t;
    }
    for (int e : want[i].exit_index) early += e >= 0;
  }
  EXPECT_GT(early, 5) << "too few early exits to test the exit heads under tensor parallelism";
}

INSTANTIATE_TEST_SUITE_P(Styles, TpGeneration,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

}  // namespace
}  // namespace eellm
