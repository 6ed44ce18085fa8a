// Builds a whole Model (one stage; or one tensor-parallel rank's share) from a checkpoint of any
// layout: reads its config, creates the model, loads the weights and, on request, the AdamW
// moments.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "checkpoints/sharded_checkpoint.h"
#include "models/transformer.h"

namespace eellm {

struct LoadedModel {
  std::unique_ptr<Model> model;
  CheckpointMeta meta;
  ModelConfig config;
  Buffer adam_m, adam_v;  // arenas laid out like the model's; empty unless requested and saved
};

// `with_optimizer`: also load the moments when the checkpoint has them. `tp`, `stage`: build
// this rank's tensor-parallel shard of that pipeline stage instead (every rank of the group
// calls it), whatever layout the checkpoint was saved under; not with the moments.
absl::StatusOr<LoadedModel> LoadModelFromCheckpoint(const std::string& path, Backend* backend,
                                                    bool with_optimizer = false, TpSpec tp = {},
                                                    StageSpec stage = {});

}  // namespace eellm
