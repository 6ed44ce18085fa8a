// Vocabulary-parallel embedding and cross-entropy under MPI: with the vocabulary split over all
// ranks of the world, every rank's results equal the single-rank ops on the whole vocabulary.
// Tolerance 1e-5 (losses, probabilities, gradients of O(1)): only the order of fp32 sums of
// exponentials differs.
#include <cmath>
#include <vector>

#include "engine/core/rng.h"
#include "gtest/gtest.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/tensor_parallel.h"

namespace eellm {
namespace {

std::vector<float> RandomVector(size_t n, uint64_t seed, float scale) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.Normal()) * scale;
  return v;
}

// Also with the rows' gradients weighted by their confidence (max probability), which each rank
// takes from the combined statistics.
TEST(VocabParallel, CrossEntropyMatchesFullVocabulary) {
  for (bool by_confidence : {false, true}) {
    SCOPED_TRACE(by_confidence ? "weighted by confidence" : "weights alone");
    auto world = MpiCommunicator::World(nullptr);
    const int tp = world->size(), rank = world->rank();
    auto be = std::move(*MakeBackend("cpu"));
    const int n = 7, vocab = 24 * tp;
    const VocabShard shard = ShardOfVocab(vocab, rank, tp);
    // The same full logits on every rank; rank r keeps columns [start, start + rows).
    std::vector<float> full = RandomVector(static_cast<size_t>(n) * vocab, 5, 3.0f);
    std::vector<int32_t> targets(n);
    Rng rng(6);
    for (auto& t : targets) t = static_cast<int32_t>(rng.Below(vocab));
    std::vector<float> weights = {0.5f, 0.0f, 1.0f, 2.0f, 0.25f, 1.0f, 0.75f};
    std::vector<float> ref_loss(n), ref_prob(n), ref_grad(full.size());
    be->CrossEntropy(ref_loss.data(), ref_prob.data(), ref_grad.data(), full.data(), targets.data(),
                     weights.data(), by_confidence, n, vocab);
    std::vector<float> local(static_cast<size_t>(n) * shard.rows);
    for (int r = 0; r < n; ++r) {
      for (int j = 0; j < shard.rows; ++j) {
        local[static_cast<size_t>(r) * shard.rows + j] =
            full[static_cast<size_t>(r) * vocab + shard.start + j];
      }
    }
    std::vector<float> loss(n), prob(n), grad(local.size());
    VocabParallelCrossEntropy ce(be.get(), world.get(), n);
    ce.Run(loss.data(), prob.data(), grad.data(), local.data(), targets.data(), weights.data(),
           by_confidence, n, shard);
    for (int r = 0; r < n; ++r) {
      EXPECT_NEAR(loss[r], ref_loss[r], 1e-5) << "row " << r;
      EXPECT_NEAR(prob[r], ref_prob[r], 1e-6) << "row " << r;
      for (int j = 0; j < shard.rows; ++j) {
        EXPECT_NEAR(grad[static_cast<size_t>(r) * shard.rows + j],
                    ref_grad[static_cast<size_t>(r) * vocab + shard.start + j], 1e-6)
            << "row " << r << " column " << shard.start + j;
      }
    }
    // dlogits may alias the logits.
    ce.Run(loss.data(), nullptr, local.data(), local.data(), targets.data(), weights.data(),
           by_confidence, n, shard);
    EXPECT_NEAR(local[shard.rows + 1], ref_grad[vocab + shard.start + 1], 1e-6);
  }
}

TEST(VocabParallel, EmbeddingMatchesFullTable) {
  auto world = MpiCommunicator::World(nullptr);
  const int tp = world->size(), rank = world->rank();
  auto be = std::move(*MakeBackend("cpu"));
  const int n = 9, c = 5, vocab = 4 * tp;
  const VocabShard shard = ShardOfVocab(vocab, rank, tp);
  std::vector<float> table = RandomVector(static_cast<size_t>(vocab) * c, 7, 1.0f);
  std::vector<int32_t> ids(n);
  Rng rng(8);
  for (auto& t : ids) t = static_cast<int32_t>(rng.Below(vocab));
  std::vector<float> ref(static_cast<size_t>(n) * c), out(ref.size());
  be->EmbeddingForward(ref.data(), ids.data(), table.data(), n, c);
  VocabParallelEmbedding(be.get(), world.get(), out.data(), ids.data(),
                         table.data() + static_cast<size_t>(shard.start) * c, n, c, shard);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(out[i], ref[i]) << i;
  // Backward: each rank's slice of the table gradient equals that slice of the full gradient.
  std::vector<float> dout = RandomVector(ref.size(), 9, 1.0f);
  std::vector<float> dfull(table.size(), 0.0f), dlocal(static_cast<size_t>(shard.rows) * c, 0.0f);
  be->EmbeddingBackward(dfull.data(), ids.data(), dout.data(), n, c);
  be->EmbeddingBackwardRange(dlocal.data(), ids.data(), dout.data(), n, c, shard.start, shard.rows);
  for (size_t i = 0; i < dlocal.size(); ++i) {
    EXPECT_EQ(dlocal[i], dfull[static_cast<size_t>(shard.start) * c + i]) << i;
  }
}

}  // namespace
}  // namespace eellm
