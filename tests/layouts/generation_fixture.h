// What the generation layout tests (tp_generation_test, pp_generation_test) share: a test model
// saved once by rank 0 for every rank to load, and a rank's shard of it for a pipeline of
// tensor-parallel groups.
#pragma once

#include <unistd.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/core/status.h"
#include "launch/model_loader.h"
#include "parallel/topology.h"
#include "tests/models/model_test_util.h"

namespace eellm::testing {

// Saves a model of config `c` filled with fixed values (FillParams(17, 0.5), as the tests'
// whole models) from rank 0 of `world`; returns the file every rank reads, named by rank 0's pid
// and `tag`. Every rank calls it.
inline std::string SaveFilledModel(Communicator* world, const ModelConfig& c,
                                   const std::string& tag) {
  int pid = getpid();
  world->Broadcast(&pid, sizeof(pid), 0);
  const std::string file = "/tmp/eellm_generation_" + std::to_string(pid) + "_" + tag + ".h5";
  if (world->rank() == 0) {
    auto be = std::move(*MakeBackend("cpu"));
    auto whole = *Model::Create(c, be.get());
    FillParams(*whole, 17, 0.5f);
    CheckpointMeta meta;
    meta.config_json = c.ToJson();
    EE_CHECK(SaveCheckpoint(file, whole->params(), meta).ok(), "cannot save ", file);
  }
  world->Barrier();
  return file;
}

// This rank's shard of `file` in a pipeline of `pp` stages of `tp` ranks (Megatron order:
// RankGrid with dp 1), with its stage's tensor-parallel group over `device_world` (which every
// rank passes: the groups are made collectively).
struct StageShard {
  int stage = 0;
  std::unique_ptr<Communicator> tp_group;
  LoadedModel loaded;
};
inline absl::StatusOr<StageShard> LoadStageShard(const std::string& file, Backend* be,
                                                 Communicator* device_world, int pp, int tp) {
  ASSIGN_OR_RETURN(RankGrid grid, RankGrid::Create(tp, pp, 1, device_world->size()));
  StageShard s;
  s.stage = grid.CoordOf(device_world->rank()).pp;
  s.tp_group = device_world->Subgroup(grid.TpGroup(device_world->rank()));
  ASSIGN_OR_RETURN(s.loaded, LoadModelFromCheckpoint(
                                 file, be, false, TpSpec{s.tp_group->rank(), tp, s.tp_group.get()},
                                 StageSpec{s.stage, pp}));
  return s;
}

}  // namespace eellm::testing
