#include "parallel/topology.h"

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace eellm {

absl::StatusOr<RankGrid> RankGrid::Create(int tp, int pp, int dp, int world) {
  if (tp < 1 || pp < 1 || dp < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel sizes must be >= 1, got tp ", tp, ", pp ", pp, ", dp ", dp));
  }
  if (static_cast<long>(tp) * pp * dp != world) {
    return absl::InvalidArgumentError(absl::StrCat("world size ", world,
                                                   " is not tp * pp * dp = ", tp, " * ", pp, " * ",
                                                   dp, " = ", static_cast<long>(tp) * pp * dp));
  }
  RankGrid g;
  g.tp_ = tp;
  g.pp_ = pp;
  g.dp_ = dp;
  return g;
}

GridCoord RankGrid::CoordOf(int rank) const {
  GridCoord c;
  c.tp = rank % tp_;
  c.dp = (rank / tp_) % dp_;
  c.pp = rank / (tp_ * dp_);
  return c;
}

int RankGrid::RankOf(const GridCoord& c) const { return c.tp + tp_ * (c.dp + dp_ * c.pp); }

std::vector<int> RankGrid::TpGroup(int rank) const {
  GridCoord c = CoordOf(rank);
  std::vector<int> g;
  for (c.tp = 0; c.tp < tp_; ++c.tp) g.push_back(RankOf(c));
  return g;
}

std::vector<int> RankGrid::DpGroup(int rank) const {
  GridCoord c = CoordOf(rank);
  std::vector<int> g;
  for (c.dp = 0; c.dp < dp_; ++c.dp) g.push_back(RankOf(c));
  return g;
}

std::vector<int> RankGrid::PpGroup(int rank) const {
  GridCoord c = CoordOf(rank);
  std::vector<int> g;
  for (c.pp = 0; c.pp < pp_; ++c.pp) g.push_back(RankOf(c));
  return g;
}

std::vector<int> RankGrid::EmbeddingGroup(int rank) const {
  GridCoord c = CoordOf(rank);
  c.pp = 0;
  std::vector<int> g = {RankOf(c)};
  if (pp_ > 1) {
    c.pp = pp_ - 1;
    g.push_back(RankOf(c));
  }
  return g;
}

namespace {

// Reads an integer environment variable; absent -> `missing` (true when absent).
absl::Status ReadEnvInt(const char* name, int* out, bool* missing) {
  const char* v = std::getenv(name);
  *missing = v == nullptr;
  if (*missing) return absl::OkStatus();
  if (!absl::SimpleAtoi(v, out) || *out < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, "=\"", v, "\" is not a non-negative integer"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LaunchInfo> DetectLaunch() {
  struct Source {
    const char* launcher;
    const char *rank, *world, *local, *local_size;
  };
  const Source sources[] = {
      {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
  };
  for (const Source& s : sources) {
    LaunchInfo info;
    bool no_rank, no_world, no_local;
    absl::Status st = ReadEnvInt(s.rank, &info.rank, &no_rank);
    if (!st.ok()) return st;
    if (no_rank) continue;
    st = ReadEnvInt(s.world, &info.world, &no_world);
    if (!st.ok()) return st;
    st = ReadEnvInt(s.local, &info.local_rank, &no_local);
    if (!st.ok()) return st;
    bool no_local_size;
    st = ReadEnvInt(s.local_size, &info.local_size, &no_local_size);
    if (!st.ok()) return st;
    if (no_local_size && std::string(s.launcher) == "slurm") {
      // Without --ntasks-per-node: SLURM_TASKS_PER_NODE ("2(x3),1"): the first nodes' count.
      const char* per_node = std::getenv("SLURM_TASKS_PER_NODE");
      if (per_node != nullptr) info.local_size = std::atoi(per_node);
    }
    if (info.local_size < 1) info.local_size = 1;
    if (no_world || info.world < 1 || info.rank >= info.world) {
      return absl::InvalidArgumentError(
          absl::StrCat(s.rank, "=", info.rank, " needs ", s.world, " set and larger"));
    }
    info.launcher = s.launcher;
    return info;
  }
  LaunchInfo single;
  single.launcher = "single";
  return single;
}

}  // namespace eellm
