// Tensor parallelism at the model level, under mpirun: with heads, FFN columns and the
// vocabulary split over all ranks of the world, one forward/backward of a model with exits of
// every kind gives the single-rank losses, and each rank's gradient shards equal the matching
// slices of the single-rank gradients. Tolerance: 2e-5 relative to the tensor's largest
// gradient; tensor parallelism only reorders fp32 sums (partial GEMM outputs, vocabulary
// statistics) before they are all-reduced (GPT's exits confidence-weighted). The same with
// sequence parallelism (each rank holds
// its block of the rows between the branches; the norms' gradients are the ranks' sums).
#include <cmath>
#include <cstdio>
#include <vector>

#include "gtest/gtest.h"
#include "models/transformer.h"
#include "parallel/comm/mpi_communicator.h"

namespace eellm {
namespace {

// `qkv_bias`: Llama with biases on q, k, v (Qwen2). (Biases replicated with their KV heads:
// train_layouts_test.cc's llama-mqa.)
ModelConfig TpConfig(ModelStyle style, bool qkv_bias) {
  ModelConfig c;
  c.style = style;
  c.qkv_bias = qkv_bias;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.num_layers = 3;
  c.num_heads = 8;
  c.num_kv_heads = style == ModelStyle::kLlama ? 4 : 8;
  c.ffn_hidden_size = 48;
  c.max_seq_len = 16;
  c.tie_embeddings = style == ModelStyle::kGpt;
  ExitConfig a, b, d;
  a.layer = 1;
  a.kind = ExitKind::kNorm;
  a.tied = true;
  b.layer = 2;
  b.kind = ExitKind::kMlp;  // post: shares layer 2's attention
  d.layer = 3;
  d.kind = ExitKind::kBlock;
  d.position = ExitPosition::kPre;
  c.exits = {a, b, d};
  // GPT's exit losses weighted by confidence: each rank weights its vocabulary columns'
  // gradients by the max probability of the combined row statistics.
  c.confidence_weighted_exit_loss = style == ModelStyle::kGpt;
  return c;
}

class TpModel : public ::testing::TestWithParam<std::pair<ModelStyle, bool>> {};

TEST_P(TpModel, ShardsMatchTheWholeModel) {
  auto world = MpiCommunicator::World(nullptr);
  const int tp = world->size(), rank = world->rank();
  ModelConfig c = TpConfig(GetParam().first, GetParam().second);
  if (c.num_kv_heads % tp != 0 || c.ffn_hidden_size % tp != 0) {
    GTEST_SKIP() << "the test model does not split over " << tp << " ranks";
  }
  auto be = std::move(*MakeBackend("cpu"));
  size_t workspace_bytes[2] = {0, 0};  // without, with sequence parallelism
  for (bool sp : {false, true}) {
    SCOPED_TRACE(sp ? "sequence parallel" : "tensor parallel");
    auto whole = *Model::Create(c, be.get());
    auto part = *Model::Create(c, be.get(), StageSpec{}, TpSpec{rank, tp, world.get(), sp});
    whole->InitRandom(3);
    part->InitRandom(3);
    const int b = 2, t = 8, n = b * t;
    std::vector<int32_t> ids(n), tg(n);
    for (int i = 0; i < n; ++i) {
      ids[i] = (i * 7 + 3) % c.vocab_size;
      tg[i] = (i * 11 + 5) % c.vocab_size;
    }
    std::vector<float> w = {0.5f, 0.3f, 0.2f};
    auto ws_whole = whole->MakeWorkspace(b, t);
    auto ws_part = part->MakeWorkspace(b, t);
    workspace_bytes[sp] = ws_part->arena.bytes();
    whole->params().ZeroGrads();
    part->params().ZeroGrads();
    LossReport rw = whole->ForwardBackward(*ws_whole, ids.data(), tg.data(), nullptr, w, true);
    LossReport rp = part->ForwardBackward(*ws_part, ids.data(), tg.data(), nullptr, w, true);
    EXPECT_NEAR(rp.final_loss, rw.final_loss, 1e-5);
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(rp.exit_losses[i], rw.exit_losses[i], 1e-5);
    EXPECT_NEAR(rp.objective, rw.objective, 1e-5);
    const ParamStore& ps = part->params();
    for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
      const ParamInfo& p = ps.params()[i];
      const int j = whole->params().Find(p.name);
      ASSERT_GE(j, 0) << p.name;
      const ParamInfo& q = whole->params().params()[j];
      std::vector<float> summed;  // sequence parallelism: the norms' partial sums over the ranks
      const float* g = ps.grad(i);
      if (p.sum_grad_over_tp) {
        summed.assign(g, g + p.numel);
        world->AllReduce(summed.data(), p.numel, ReduceOp::kSum);
        g = summed.data();
      }
      EXPECT_EQ(p.sum_grad_over_tp, sp && tp > 1 && p.name.find("norm.") != std::string::npos)
          << p.name;
      const float* full = whole->params().grad(j);
      double max_full = 0, max_diff = 0;
      for (size_t k = 0; k < q.numel; ++k)
        max_full = std::max(max_full, std::fabs(double{full[k]}));
      for (size_t k = 0; k < p.numel; ++k) {
        size_t fk = k;  // index of local element k in the whole tensor
        if (p.split_dim == 0) {
          fk = rank * p.numel + k;
        } else if (p.split_dim == 1) {
          const size_t cols = p.shape[1];
          fk = (k / cols) * cols * tp + rank * cols + k % cols;
        }
        max_diff = std::max(max_diff, std::fabs(double{g[k]} - full[fk]));
      }
      EXPECT_LE(max_diff, 2e-5 * max_full + 1e-9) << p.name << " (split " << p.split_dim << ")";
      EXPECT_GT(max_full, 0.0) << p.name;
    }
  }
  // The residual stream, the norms and the exits' inputs take 1/tp of their rows.
  if (tp > 1) {
    EXPECT_LT(workspace_bytes[1], workspace_bytes[0]);
  }
  if (rank == 0) {
    std::printf("tp %d: a workspace holds %zu bytes, %zu with sequence parallelism\n", tp,
                workspace_bytes[0], workspace_bytes[1]);
  }
}

INSTANTIATE_TEST_SUITE_P(Styles, TpModel,
                         ::testing::Values(std::pair{ModelStyle::kGpt, false},
                                           std::pair{ModelStyle::kLlama, false},
                                           std::pair{ModelStyle::kLlama, true}));

}  // namespace
}  // namespace eellm
