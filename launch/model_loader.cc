#include "launch/model_loader.h"

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace eellm {

absl::StatusOr<LoadedModel> LoadModelFromCheckpoint(const std::string& path, Backend* backend,
                                                    bool with_optimizer) {
  LoadedModel r;
  ASSIGN_OR_RETURN(r.meta, ReadCheckpointMeta(path));
  auto config = ParseModelConfig(r.meta.config_json);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": stored model config is invalid: ", config.status().message()));
  }
  r.config = *config;
  ASSIGN_OR_RETURN(r.model, Model::Create(*config, backend));
  float *m = nullptr, *v = nullptr;
  if (with_optimizer) {
    ASSIGN_OR_RETURN(bool has, CheckpointHasOptimizerState(path));
    if (has) {
      const size_t bytes = r.model->params().padded_size() * sizeof(float);
      r.adam_m = Buffer(backend, bytes);
      r.adam_v = Buffer(backend, bytes);
      m = r.adam_m.f32();
      v = r.adam_v.f32();
    }
  }
  RETURN_IF_ERROR(LoadCheckpoint(path, r.model->params(), m, v));
  return r;
}

}  // namespace eellm
