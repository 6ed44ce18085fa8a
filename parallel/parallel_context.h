// ParallelContext: this rank's place in the (tp, pp, dp) grid and its communicators (world,
// tensor-, data- and pipeline-parallel, embedding group). Built once at start-up and passed
// explicitly to everything that communicates; never global.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "parallel/comm/communicator.h"
#include "parallel/topology.h"

namespace eellm {

struct ParallelContext {
  RankGrid grid;
  int rank = 0;
  GridCoord coord;
  // `embedding` joins the first and last pipeline stage of this rank's pipeline (tied input /
  // output embeddings; the rank alone when pp == 1); it is null on the middle stages.
  std::unique_ptr<Communicator> world, tp, dp, pp, embedding;

  bool is_first_stage() const { return coord.pp == 0; }
  bool is_last_stage() const { return coord.pp == grid.pp() - 1; }

  // Splits `world` into the groups of the (tp, pp, dp) layout. Fails on every rank alike,
  // naming the numbers, when tp * pp * dp != world size.
  static absl::StatusOr<std::unique_ptr<ParallelContext>> Create(
      std::unique_ptr<Communicator> world, int tp, int pp, int dp);
  // One rank, no MPI: every group is the rank itself (SelfCommunicators on host memory; to
  // copy device buffers, pass Create a SelfCommunicator built with the backend instead).
  static std::unique_ptr<ParallelContext> Single();
};

}  // namespace eellm
