// RankGrid: the (tp, pp, dp) layout of ranks, pure arithmetic (Megatron order: tensor-parallel
// rank fastest, then data-parallel, then pipeline stage), and LaunchInfo: this process's rank,
// world size and local rank as given by mpirun (OMPI_COMM_WORLD_*), Slurm srun (SLURM_PROCID,
// SLURM_NTASKS, SLURM_LOCALID) or a plain single process.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace eellm {

struct GridCoord {
  int tp = 0, dp = 0, pp = 0;
  bool operator==(const GridCoord& o) const { return tp == o.tp && dp == o.dp && pp == o.pp; }
};

class RankGrid {
 public:
  // Fails (naming the numbers) unless all sizes are >= 1 and tp * pp * dp == world.
  static absl::StatusOr<RankGrid> Create(int tp, int pp, int dp, int world);

  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int world() const { return tp_ * pp_ * dp_; }

  // rank = tp_rank + tp * (dp_rank + dp * pp_rank).
  GridCoord CoordOf(int rank) const;
  int RankOf(const GridCoord& c) const;

  // The ranks of each group that `rank` belongs to, in group-rank order.
  std::vector<int> TpGroup(int rank) const;  // same dp, pp; tp = 0 .. tp-1
  std::vector<int> DpGroup(int rank) const;  // same tp, pp
  std::vector<int> PpGroup(int rank) const;  // same tp, dp; stage 0 .. pp-1
  // First and last pipeline stage of this rank's pipeline (tied embedding / output weights);
  // a single rank when pp == 1.
  std::vector<int> EmbeddingGroup(int rank) const;

 private:
  int tp_ = 1, pp_ = 1, dp_ = 1;
};

struct LaunchInfo {
  int rank = 0;
  int world = 1;
  int local_rank = 0;    // picks the GPU
  int local_size = 1;    // processes on this machine (1 when the launcher does not say)
  std::string launcher;  // "mpirun", "slurm" or "single"
};

// Reads the launcher's environment variables; errors name a malformed variable.
absl::StatusOr<LaunchInfo> DetectLaunch();

}  // namespace eellm
