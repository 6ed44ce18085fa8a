#include "launch/model_loader.h"

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace eellm {

absl::StatusOr<LoadedModel> LoadModelFromCheckpoint(const std::string& path, Backend* backend) {
  LoadedModel r;
  ASSIGN_OR_RETURN(r.meta, ReadCheckpointMeta(path));
  auto config = ParseModelConfig(r.meta.config_json);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": stored model config is invalid: ", config.status().message()));
  }
  ASSIGN_OR_RETURN(r.model, Model::Create(*config, backend));
  RETURN_IF_ERROR(LoadCheckpoint(path, r.model->params()));
  return r;
}

}  // namespace eellm
