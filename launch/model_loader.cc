#include "launch/model_loader.h"

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "launch/checkpoint_layout.h"

namespace eellm {

absl::StatusOr<LoadedModel> LoadModelFromCheckpoint(const std::string& path, Backend* backend,
                                                    bool with_optimizer, TpSpec tp,
                                                    StageSpec stage) {
  LoadedModel r;
  ASSIGN_OR_RETURN(r.meta, ReadCheckpointMeta(path));
  auto config = ParseModelConfig(r.meta.config_json);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": stored model config is invalid: ", config.status().message()));
  }
  r.config = *config;
  if (tp.size > 1 || stage.stages > 1) {
    if (with_optimizer) {
      return absl::UnimplementedError("loading AdamW moments into a shard of the model");
    }
    if (config->num_layers % stage.stages != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": the model's ", config->num_layers,
                                                     " layers do not split over ", stage.stages,
                                                     " pipeline stages"));
    }
    if (!SplitsOverTp(*config, tp.size)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": the model (", config->num_heads, " heads, ", config->num_kv_heads,
                       " KV heads, FFN ", config->ffn_hidden_size, ", vocabulary ",
                       config->vocab_size, ") does not split over tensor parallelism ", tp.size));
    }
    ASSIGN_OR_RETURN(r.model, Model::Create(*config, backend, stage, tp, ModelGradients::kNone));
    RETURN_IF_ERROR(LoadCheckpoint(path, {ChunkStateFor(*r.model, tp.rank, tp.size, true)}));
    return r;
  }
  // Without the optimizer state: no gradients either (inference, conversions). With it, the
  // moments are laid out over the whole arena, as the gradients are.
  ASSIGN_OR_RETURN(r.model,
                   Model::Create(*config, backend, {}, {},
                                 with_optimizer ? ModelGradients::kAll : ModelGradients::kNone));
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
