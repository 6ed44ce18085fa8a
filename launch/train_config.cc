#include "launch/train_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/optim/schedules.h"
#include "models/json_fields.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

absl::Status Invalid(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("train config: ", msg));
}

}  // namespace

absl::StatusOr<RunConfig> ParseRunConfig(const std::string& json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("run config is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError("run config must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() != "model" && it.key() != "train") {
      return absl::InvalidArgumentError(
          absl::StrCat("run config: unknown key \"", it.key(), "\" (allowed: model, train)"));
    }
  }
  if (!j.contains("model")) return absl::InvalidArgumentError("run config: missing \"model\"");
  RunConfig rc;
  ASSIGN_OR_RETURN(rc.model, ParseModelConfig(j["model"].dump()));
  rc.model_json = rc.model.ToJson();
  TrainConfig& t = rc.train;
  if (j.contains("train")) {
    const json& tj = j["train"];
    RETURN_IF_ERROR(CheckJsonKeys(tj,
                                  {"data",
                                   "tokenizer",
                                   "backend",
                                   "out",
                                   "batch_size",
                                   "seq_len",
                                   "steps",
                                   "lr",
                                   "min_lr",
                                   "warmup_steps",
                                   "weight_decay",
                                   "beta1",
                                   "beta2",
                                   "grad_clip",
                                   "seed",
                                   "log_interval",
                                   "eval_interval",
                                   "eval_batches",
                                   "save_interval",
                                   "keep_checkpoints",
                                   "tp",
                                   "pp",
                                   "dp",
                                   "zero1",
                                   "grad_bucket_size",
                                   "overlap_grad_reduce",
                                   "micro_batch_size",
                                   "exit_placement",
                                   "sampling",
                                   "hidden_dropout",
                                   "tensorboard_dir",
                                   "communicator",
                                   "virtual_stages",
                                   "freeze_backbone",
                                   "skip_layers_past_exits",
                                   "tune_cache_mb",
                                   "val_fraction",
                                   "exit_duration_mins",
                                   "adam_eps",
                                   "lr_decay_style",
                                   "lr_decay_steps",
                                   "lr_warmup_fraction",
                                   "init_method_std",
                                   "metrics",
                                   "exit_signal_handler",
                                   "eod_mask_loss",
                                   "sequence_parallel"},
                                  "train config"));
    RETURN_IF_ERROR(ReadJsonField(tj, "data", "train config", &t.data));
    RETURN_IF_ERROR(ReadJsonField(tj, "val_fraction", "train config", &t.val_fraction));
    RETURN_IF_ERROR(ReadJsonField(tj, "adam_eps", "train config", &t.adam_eps));
    RETURN_IF_ERROR(ReadJsonField(tj, "lr_decay_style", "train config", &t.lr_decay_style));
    RETURN_IF_ERROR(ReadJsonField(tj, "lr_decay_steps", "train config", &t.lr_decay_steps));
    RETURN_IF_ERROR(ReadJsonField(tj, "lr_warmup_fraction", "train config", &t.lr_warmup_fraction));
    if (t.lr_warmup_fraction != 0 && tj.contains("warmup_steps")) {
      return Invalid("give warmup_steps or lr_warmup_fraction, not both");
    }
    RETURN_IF_ERROR(ReadJsonField(tj, "init_method_std", "train config", &t.init_method_std));
    RETURN_IF_ERROR(ReadJsonField(tj, "metrics", "train config", &t.metrics));
    RETURN_IF_ERROR(ReadJsonField(tj, "exit_duration_mins", "train config", &t.exit_duration_mins));
    RETURN_IF_ERROR(
        ReadJsonField(tj, "exit_signal_handler", "train config", &t.exit_signal_handler));
    RETURN_IF_ERROR(ReadJsonField(tj, "tokenizer", "train config", &t.tokenizer));
    RETURN_IF_ERROR(ReadJsonField(tj, "backend", "train config", &t.backend));
    RETURN_IF_ERROR(ReadJsonField(tj, "out", "train config", &t.out));
    RETURN_IF_ERROR(ReadJsonField(tj, "batch_size", "train config", &t.batch_size));
    RETURN_IF_ERROR(ReadJsonField(tj, "micro_batch_size", "train config", &t.micro_batch_size));
    RETURN_IF_ERROR(ReadJsonField(tj, "exit_placement", "train config", &t.exit_placement));
    RETURN_IF_ERROR(ReadJsonField(tj, "sampling", "train config", &t.sampling));
    RETURN_IF_ERROR(ReadJsonField(tj, "hidden_dropout", "train config", &t.hidden_dropout));
    RETURN_IF_ERROR(ReadJsonField(tj, "tensorboard_dir", "train config", &t.tensorboard_dir));
    RETURN_IF_ERROR(ReadJsonField(tj, "communicator", "train config", &t.communicator));
    RETURN_IF_ERROR(ReadJsonField(tj, "seq_len", "train config", &t.seq_len));
    RETURN_IF_ERROR(ReadJsonField(tj, "steps", "train config", &t.steps));
    RETURN_IF_ERROR(ReadJsonField(tj, "lr", "train config", &t.lr));
    RETURN_IF_ERROR(ReadJsonField(tj, "min_lr", "train config", &t.min_lr));
    RETURN_IF_ERROR(ReadJsonField(tj, "warmup_steps", "train config", &t.warmup_steps));
    RETURN_IF_ERROR(ReadJsonField(tj, "weight_decay", "train config", &t.weight_decay));
    RETURN_IF_ERROR(ReadJsonField(tj, "beta1", "train config", &t.beta1));
    RETURN_IF_ERROR(ReadJsonField(tj, "beta2", "train config", &t.beta2));
    RETURN_IF_ERROR(ReadJsonField(tj, "grad_clip", "train config", &t.grad_clip));
    RETURN_IF_ERROR(ReadJsonField(tj, "seed", "train config", &t.seed));
    RETURN_IF_ERROR(ReadJsonField(tj, "log_interval", "train config", &t.log_interval));
    RETURN_IF_ERROR(ReadJsonField(tj, "eval_interval", "train config", &t.eval_interval));
    RETURN_IF_ERROR(ReadJsonField(tj, "eval_batches", "train config", &t.eval_batches));
    RETURN_IF_ERROR(ReadJsonField(tj, "save_interval", "train config", &t.save_interval));
    RETURN_IF_ERROR(ReadJsonField(tj, "keep_checkpoints", "train config", &t.keep_checkpoints));
    RETURN_IF_ERROR(ReadJsonField(tj, "tp", "train config", &t.tp));
    RETURN_IF_ERROR(ReadJsonField(tj, "pp", "train config", &t.pp));
    RETURN_IF_ERROR(ReadJsonField(tj, "dp", "train config", &t.dp));
    RETURN_IF_ERROR(ReadJsonField(tj, "zero1", "train config", &t.zero1));
    RETURN_IF_ERROR(ReadJsonField(tj, "grad_bucket_size", "train config", &t.grad_bucket_size));
    RETURN_IF_ERROR(
        ReadJsonField(tj, "overlap_grad_reduce", "train config", &t.overlap_grad_reduce));
    RETURN_IF_ERROR(ReadJsonField(tj, "virtual_stages", "train config", &t.virtual_stages));
    RETURN_IF_ERROR(ReadJsonField(tj, "freeze_backbone", "train config", &t.freeze_backbone));
    RETURN_IF_ERROR(
        ReadJsonField(tj, "skip_layers_past_exits", "train config", &t.skip_layers_past_exits));
    RETURN_IF_ERROR(ReadJsonField(tj, "tune_cache_mb", "train config", &t.tune_cache_mb));
    RETURN_IF_ERROR(ReadJsonField(tj, "eod_mask_loss", "train config", &t.eod_mask_loss));
    RETURN_IF_ERROR(ReadJsonField(tj, "sequence_parallel", "train config", &t.sequence_parallel));
  }
  for (auto [v, k] : {std::pair{t.batch_size, "batch_size"},
                      {t.seq_len, "seq_len"},
                      {t.steps, "steps"},
                      {t.log_interval, "log_interval"},
                      {t.eval_batches, "eval_batches"}}) {
    if (v <= 0) return Invalid(absl::StrCat(k, " must be positive, got ", v));
  }
  RETURN_IF_ERROR(ParseLrDecay(t.lr_decay_style).status());
  if (!(t.lr_warmup_fraction >= 0 && t.lr_warmup_fraction < 1)) {
    return Invalid(
        absl::StrCat("lr_warmup_fraction must be in [0, 1), got ", t.lr_warmup_fraction));
  }
  if (t.lr_decay_steps < 0) {
    return Invalid(absl::StrCat("lr_decay_steps must be >= 0 (0 = steps), got ", t.lr_decay_steps));
  }
  if (t.lr_decay_steps > 0 && t.lr_decay_steps <= t.warmup_steps &&
      (t.lr_decay_style == "cosine" || t.lr_decay_style == "linear")) {
    return Invalid(absl::StrCat("lr_decay_steps ", t.lr_decay_steps, " must be above warmup_steps ",
                                t.warmup_steps));
  }
  if (!(t.adam_eps > 0) || !(t.init_method_std > 0)) {
    return Invalid(absl::StrCat("adam_eps and init_method_std must be positive, got ", t.adam_eps,
                                ", ", t.init_method_std));
  }
  if (!(t.exit_duration_mins >= 0)) {
    return Invalid(
        absl::StrCat("exit_duration_mins must be >= 0 (0 = never), got ", t.exit_duration_mins));
  }
  if (!(t.val_fraction > 0 && t.val_fraction <= 0.5)) {
    return Invalid(absl::StrCat("val_fraction must be in (0, 0.5], got ", t.val_fraction));
  }
  if (t.grad_bucket_size < 1) {
    return Invalid(absl::StrCat("grad_bucket_size must be >= 1, got ", t.grad_bucket_size));
  }
  if (t.warmup_steps < 0 || t.eval_interval < 0 || t.save_interval < 0 || t.keep_checkpoints < 0) {
    return Invalid("warmup_steps, eval_interval, save_interval and keep_checkpoints must be >= 0");
  }
  if (t.communicator != "auto" && t.communicator != "nccl" && t.communicator != "mpi") {
    return Invalid(absl::StrCat("communicator \"", t.communicator, "\" is not auto, nccl or mpi"));
  }
  if (t.exit_placement != "bubbles" && t.exit_placement != "backward") {
    return Invalid(
        absl::StrCat("exit_placement \"", t.exit_placement, "\" is not bubbles or backward"));
  }
  if (!(t.hidden_dropout >= 0 && t.hidden_dropout < 1)) {
    return Invalid(absl::StrCat("hidden_dropout must be in [0, 1), got ", t.hidden_dropout));
  }
  if (t.sampling != "epochs" && t.sampling != "random") {
    return Invalid(absl::StrCat("sampling \"", t.sampling, "\" is not epochs or random"));
  }
  if (t.seq_len > rc.model.max_seq_len) {
    return Invalid(absl::StrCat("seq_len ", t.seq_len, " exceeds the model's max_seq_len ",
                                rc.model.max_seq_len));
  }
  if (!(t.lr > 0) || t.min_lr < 0 || t.min_lr > t.lr) {
    return Invalid(
        absl::StrCat("need 0 <= min_lr <= lr and lr > 0, got lr ", t.lr, ", min_lr ", t.min_lr));
  }
  if (!(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1)) {
    return Invalid(absl::StrCat("betas must be in [0, 1), got ", t.beta1, ", ", t.beta2));
  }
  return rc;
}

absl::StatusOr<RunConfig> LoadRunConfig(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open config ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  auto rc = ParseRunConfig(ss.str());
  if (!rc.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", rc.status().message()));
  return rc;
}

std::string TrainConfigToJson(const TrainConfig& t) {
  json j = {{"data", t.data},
            {"val_fraction", t.val_fraction},
            {"exit_duration_mins", t.exit_duration_mins},
            {"adam_eps", t.adam_eps},
            {"lr_decay_style", t.lr_decay_style},
            {"lr_decay_steps", t.lr_decay_steps},
            {"lr_warmup_fraction", t.lr_warmup_fraction},
            {"init_method_std", t.init_method_std},
            {"metrics", t.metrics},
            {"exit_signal_handler", t.exit_signal_handler},
            {"tokenizer", t.tokenizer},
            {"backend", t.backend},
            {"out", t.out},
            {"batch_size", t.batch_size},
            {"micro_batch_size", t.micro_batch_size},
            {"exit_placement", t.exit_placement},
            {"sampling", t.sampling},
            {"hidden_dropout", t.hidden_dropout},
            {"tensorboard_dir", t.tensorboard_dir},
            {"communicator", t.communicator},
            {"virtual_stages", t.virtual_stages},
            {"seq_len", t.seq_len},
            {"steps", t.steps},
            {"lr", t.lr},
            {"min_lr", t.min_lr},
            {"warmup_steps", t.warmup_steps},
            {"weight_decay", t.weight_decay},
            {"beta1", t.beta1},
            {"beta2", t.beta2},
            {"grad_clip", t.grad_clip},
            {"seed", t.seed},
            {"log_interval", t.log_interval},
            {"eval_interval", t.eval_interval},
            {"eval_batches", t.eval_batches},
            {"save_interval", t.save_interval},
            {"keep_checkpoints", t.keep_checkpoints},
            {"tp", t.tp},
            {"pp", t.pp},
            {"dp", t.dp},
            {"zero1", t.zero1},
            {"grad_bucket_size", t.grad_bucket_size},
            {"overlap_grad_reduce", t.overlap_grad_reduce},
            {"freeze_backbone", t.freeze_backbone},
            {"skip_layers_past_exits", t.skip_layers_past_exits},
            {"tune_cache_mb", t.tune_cache_mb},
            {"eod_mask_loss", t.eod_mask_loss},
            {"sequence_parallel", t.sequence_parallel}};
  return j.dump(2);
}

}  // namespace eellm
