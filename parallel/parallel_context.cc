#include "parallel/parallel_context.h"

#include "engine/core/status.h"
#include "parallel/comm/self_communicator.h"

namespace eellm {

absl::StatusOr<std::unique_ptr<ParallelContext>> ParallelContext::Create(
    std::unique_ptr<Communicator> world, int tp, int pp, int dp) {
  EE_CHECK(world != nullptr, "ParallelContext::Create needs a world communicator");
  ASSIGN_OR_RETURN(RankGrid grid, RankGrid::Create(tp, pp, dp, world->size()));
  auto ctx = std::make_unique<ParallelContext>();
  ctx->grid = grid;
  ctx->rank = world->rank();
  ctx->coord = grid.CoordOf(ctx->rank);
  // Subgroup is collective: every rank makes the same calls in the same order.
  ctx->tp = world->Subgroup(grid.TpGroup(ctx->rank));
  ctx->dp = world->Subgroup(grid.DpGroup(ctx->rank));
  ctx->pp = world->Subgroup(grid.PpGroup(ctx->rank));
  // Middle pipeline stages hold no embedding: they take part in the split with a group of
  // their own (the groups must partition the world) and keep no embedding communicator.
  const std::vector<int> embedding = grid.EmbeddingGroup(ctx->rank);
  const bool in_embedding = ctx->is_first_stage() || ctx->is_last_stage();
  auto emb = world->Subgroup(in_embedding ? embedding : std::vector<int>{ctx->rank});
  if (in_embedding) ctx->embedding = std::move(emb);
  ctx->world = std::move(world);
  return ctx;
}

std::unique_ptr<ParallelContext> ParallelContext::Single() {
  auto ctx = std::make_unique<ParallelContext>();
  ctx->grid = RankGrid::Create(1, 1, 1, 1).value();
  ctx->world = std::make_unique<SelfCommunicator>();
  ctx->tp = std::make_unique<SelfCommunicator>();
  ctx->dp = std::make_unique<SelfCommunicator>();
  ctx->pp = std::make_unique<SelfCommunicator>();
  ctx->embedding = std::make_unique<SelfCommunicator>();
  return ctx;
}

}  // namespace eellm
