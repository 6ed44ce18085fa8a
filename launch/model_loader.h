// Builds a Model from an HDF5 checkpoint: reads its config, creates the model, loads weights.
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
};

absl::StatusOr<LoadedModel> LoadModelFromCheckpoint(const std::string& path, Backend* backend);

}  // namespace eellm
