#include "launch/train_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

absl::Status Invalid(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("train config: ", msg));
}

// Reads json[key] into *out when present, checking its type.
template <typename T>
absl::Status Read(const json& j, const char* key, T* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  bool ok;
  if constexpr (std::is_same_v<T, int>)
    ok = it->is_number_integer();
  else if constexpr (std::is_same_v<T, float>)
    ok = it->is_number();
  else
    ok = it->is_string();
  if (!ok) return Invalid(absl::StrCat("key \"", key, "\" has the wrong type: ", it->dump()));
  *out = it->get<T>();
  return absl::OkStatus();
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
    if (!tj.is_object()) return Invalid("\"train\" must be a JSON object");
    static const char* kKeys[] = {"data",          "tokenizer",    "backend",      "out",
                                  "batch_size",    "seq_len",      "steps",        "lr",
                                  "min_lr",        "warmup_steps", "weight_decay", "beta1",
                                  "beta2",         "grad_clip",    "seed",         "log_interval",
                                  "eval_interval", "eval_batches", "save_interval"};
    for (auto it = tj.begin(); it != tj.end(); ++it) {
      bool known = false;
      for (const char* k : kKeys) known |= it.key() == k;
      if (!known) return Invalid(absl::StrCat("unknown key \"", it.key(), "\""));
    }
    RETURN_IF_ERROR(Read(tj, "data", &t.data));
    RETURN_IF_ERROR(Read(tj, "tokenizer", &t.tokenizer));
    RETURN_IF_ERROR(Read(tj, "backend", &t.backend));
    RETURN_IF_ERROR(Read(tj, "out", &t.out));
    RETURN_IF_ERROR(Read(tj, "batch_size", &t.batch_size));
    RETURN_IF_ERROR(Read(tj, "seq_len", &t.seq_len));
    RETURN_IF_ERROR(Read(tj, "steps", &t.steps));
    RETURN_IF_ERROR(Read(tj, "lr", &t.lr));
    RETURN_IF_ERROR(Read(tj, "min_lr", &t.min_lr));
    RETURN_IF_ERROR(Read(tj, "warmup_steps", &t.warmup_steps));
    RETURN_IF_ERROR(Read(tj, "weight_decay", &t.weight_decay));
    RETURN_IF_ERROR(Read(tj, "beta1", &t.beta1));
    RETURN_IF_ERROR(Read(tj, "beta2", &t.beta2));
    RETURN_IF_ERROR(Read(tj, "grad_clip", &t.grad_clip));
    RETURN_IF_ERROR(Read(tj, "seed", &t.seed));
    RETURN_IF_ERROR(Read(tj, "log_interval", &t.log_interval));
    RETURN_IF_ERROR(Read(tj, "eval_interval", &t.eval_interval));
    RETURN_IF_ERROR(Read(tj, "eval_batches", &t.eval_batches));
    RETURN_IF_ERROR(Read(tj, "save_interval", &t.save_interval));
  }
  for (auto [v, k] : {std::pair{t.batch_size, "batch_size"},
                      {t.seq_len, "seq_len"},
                      {t.steps, "steps"},
                      {t.log_interval, "log_interval"},
                      {t.eval_batches, "eval_batches"}}) {
    if (v <= 0) return Invalid(absl::StrCat(k, " must be positive, got ", v));
  }
  if (t.warmup_steps < 0 || t.eval_interval < 0 || t.save_interval < 0) {
    return Invalid("warmup_steps, eval_interval and save_interval must be >= 0");
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
            {"tokenizer", t.tokenizer},
            {"backend", t.backend},
            {"out", t.out},
            {"batch_size", t.batch_size},
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
            {"save_interval", t.save_interval}};
  return j.dump(2);
}

}  // namespace eellm
