#include "models/model_config.h"

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status.h"
#include "models/json_fields.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

absl::Status Invalid(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("model config: ", msg));
}

absl::Status Positive(int v, const std::string& key) {
  if (v <= 0) return Invalid(absl::StrCat(key, " must be positive, got ", v));
  return absl::OkStatus();
}

absl::StatusOr<ExitConfig> ParseExit(const json& e, int index, const ModelConfig& c) {
  const std::string where = absl::StrCat("exits[", index, "]");
  const std::string field = "model config " + where;
  RETURN_IF_ERROR(
      CheckJsonKeys(e,
                    {"layer", "kind", "position", "tied", "temperature", "loss_weight",
                     "loss_weight_init", "loss_weight_warmup_iters", "loss_weight_warmup"},
                    field));
  ExitConfig x;
  RETURN_IF_ERROR(ReadJsonField(e, "layer", field, &x.layer, true));
  std::string kind = "norm", position = "post", warmup = "linear";
  RETURN_IF_ERROR(ReadJsonField(e, "kind", field, &kind, false));
  RETURN_IF_ERROR(ReadJsonField(e, "position", field, &position, false));
  RETURN_IF_ERROR(ReadJsonField(e, "tied", field, &x.tied, false));
  RETURN_IF_ERROR(ReadJsonField(e, "temperature", field, &x.temperature, false));
  RETURN_IF_ERROR(ReadJsonField(e, "loss_weight", field, &x.loss_weight, false));
  x.loss_weight_init = x.loss_weight;
  RETURN_IF_ERROR(ReadJsonField(e, "loss_weight_init", field, &x.loss_weight_init, false));
  RETURN_IF_ERROR(
      ReadJsonField(e, "loss_weight_warmup_iters", field, &x.loss_weight_warmup_iters, false));
  RETURN_IF_ERROR(ReadJsonField(e, "loss_weight_warmup", field, &warmup, false));
  if (kind == "linear")
    x.kind = ExitKind::kLinear;
  else if (kind == "norm")
    x.kind = ExitKind::kNorm;
  else if (kind == "mlp")
    x.kind = ExitKind::kMlp;
  else if (kind == "block")
    x.kind = ExitKind::kBlock;
  else
    return Invalid(
        absl::StrCat(where, ".kind \"", kind, "\" is not one of linear, norm, mlp, block"));
  if (position == "post")
    x.position = ExitPosition::kPost;
  else if (position == "pre")
    x.position = ExitPosition::kPre;
  else
    return Invalid(absl::StrCat(where, ".position \"", position, "\" is not pre or post"));
  if (warmup == "linear")
    x.loss_weight_warmup = WarmupStyle::kLinear;
  else if (warmup == "cosine")
    x.loss_weight_warmup = WarmupStyle::kCosine;
  else
    return Invalid(
        absl::StrCat(where, ".loss_weight_warmup \"", warmup, "\" is not linear or cosine"));
  int max_layer = x.position == ExitPosition::kPost ? c.num_layers - 1 : c.num_layers;
  if (x.layer < 1 || x.layer > max_layer) {
    return Invalid(absl::StrCat(where, ".layer ", x.layer, " is out of range: a ", position,
                                "-layer exit needs 1 <= layer <= ", max_layer, " (num_layers ",
                                c.num_layers, ")"));
  }
  if (!(x.temperature > 0))
    return Invalid(absl::StrCat(where, ".temperature must be > 0, got ", x.temperature));
  if (x.loss_weight < 0 || x.loss_weight_init < 0)
    return Invalid(absl::StrCat(where, ": loss weights must be >= 0"));
  if (x.loss_weight_warmup_iters < 0)
    return Invalid(absl::StrCat(where, ".loss_weight_warmup_iters must be >= 0"));
  return x;
}

// "rope_scaling": {"type": "linear"|"llama3", ...}; see model_config.h.
absl::StatusOr<RopeScaling> ParseRopeScaling(const json& r) {
  const std::string field = "model config rope_scaling";
  if (!r.is_object())
    return Invalid(absl::StrCat("rope_scaling must be an object, got ", r.dump()));
  RopeScaling s;
  std::string type;
  RETURN_IF_ERROR(ReadJsonField(r, "type", field, &type, true));
  RETURN_IF_ERROR(ReadJsonField(r, "factor", field, &s.factor, true));
  if (type == "linear") {
    s.kind = RopeScalingKind::kLinear;
    RETURN_IF_ERROR(CheckJsonKeys(r, {"type", "factor"}, field));
  } else if (type == "llama3") {
    s.kind = RopeScalingKind::kLlama3;
    RETURN_IF_ERROR(CheckJsonKeys(r,
                                  {"type", "factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"},
                                  field));
    RETURN_IF_ERROR(ReadJsonField(r, "low_freq_factor", field, &s.low_freq_factor, false));
    RETURN_IF_ERROR(ReadJsonField(r, "high_freq_factor", field, &s.high_freq_factor, false));
    RETURN_IF_ERROR(ReadJsonField(r, "original_max_position_embeddings", field,
                                  &s.original_max_positions, false));
    if (!(s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor)) {
      return Invalid(absl::StrCat("rope_scaling needs 0 < low_freq_factor < high_freq_factor, got ",
                                  s.low_freq_factor, " and ", s.high_freq_factor));
    }
    RETURN_IF_ERROR(
        Positive(s.original_max_positions, "rope_scaling original_max_position_embeddings"));
  } else {
    return Invalid(absl::StrCat("rope_scaling type \"", type, "\" is not linear or llama3"));
  }
  if (!(s.factor > 0))
    return Invalid(absl::StrCat("rope_scaling factor must be > 0, got ", s.factor));
  return s;
}

}  // namespace

const char* ExitKindName(ExitKind k) {
  switch (k) {
    case ExitKind::kLinear:
      return "linear";
    case ExitKind::kNorm:
      return "norm";
    case ExitKind::kMlp:
      return "mlp";
    case ExitKind::kBlock:
      return "block";
  }
  return "?";
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("not valid JSON: ", e.what()));
  }
  const std::string where = "model config";
  RETURN_IF_ERROR(CheckJsonKeys(
      j,
      {"style", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
       "ffn_hidden_size", "max_seq_len", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings",
       "qkv_bias", "qk_norm", "confidence_weighted_exit_loss", "exits"},
      where));
  ModelConfig c;
  std::string style;
  RETURN_IF_ERROR(ReadJsonField(j, "style", where, &style, true));
  if (style == "gpt")
    c.style = ModelStyle::kGpt;
  else if (style == "llama")
    c.style = ModelStyle::kLlama;
  else
    return Invalid(absl::StrCat("style \"", style, "\" is not gpt or llama"));
  c.tie_embeddings = c.style == ModelStyle::kGpt;
  RETURN_IF_ERROR(ReadJsonField(j, "vocab_size", where, &c.vocab_size, true));
  RETURN_IF_ERROR(ReadJsonField(j, "hidden_size", where, &c.hidden_size, true));
  RETURN_IF_ERROR(ReadJsonField(j, "num_layers", where, &c.num_layers, true));
  RETURN_IF_ERROR(ReadJsonField(j, "num_heads", where, &c.num_heads, true));
  RETURN_IF_ERROR(ReadJsonField(j, "max_seq_len", where, &c.max_seq_len, true));
  c.num_kv_heads = c.num_heads;
  RETURN_IF_ERROR(ReadJsonField(j, "num_kv_heads", where, &c.num_kv_heads, false));
  RETURN_IF_ERROR(ReadJsonField(j, "ffn_hidden_size", where, &c.ffn_hidden_size, false));
  RETURN_IF_ERROR(ReadJsonField(j, "norm_eps", where, &c.norm_eps, false));
  RETURN_IF_ERROR(ReadJsonField(j, "rope_theta", where, &c.rope_theta, false));
  RETURN_IF_ERROR(ReadJsonField(j, "tie_embeddings", where, &c.tie_embeddings, false));
  RETURN_IF_ERROR(ReadJsonField(j, "qkv_bias", where, &c.qkv_bias, false));
  if (c.qkv_bias && c.style == ModelStyle::kGpt) {
    return Invalid("qkv_bias is for style llama (gpt has every bias)");
  }
  RETURN_IF_ERROR(ReadJsonField(j, "qk_norm", where, &c.qk_norm, false));
  if (c.qk_norm && c.style == ModelStyle::kGpt) return Invalid("qk_norm is for style llama");
  RETURN_IF_ERROR(ReadJsonField(j, "confidence_weighted_exit_loss", where,
                                &c.confidence_weighted_exit_loss, false));
  for (auto [v, k] : {std::pair{c.vocab_size, "vocab_size"},
                      {c.hidden_size, "hidden_size"},
                      {c.num_layers, "num_layers"},
                      {c.num_heads, "num_heads"},
                      {c.num_kv_heads, "num_kv_heads"},
                      {c.max_seq_len, "max_seq_len"}}) {
    RETURN_IF_ERROR(Positive(v, k));
  }
  RETURN_IF_ERROR(ReadJsonField(j, "head_dim", where, &c.explicit_head_dim, false));
  if (j.contains("head_dim")) {
    RETURN_IF_ERROR(Positive(c.explicit_head_dim, "head_dim"));
    if (c.style == ModelStyle::kGpt && c.explicit_head_dim * c.num_heads != c.hidden_size) {
      return Invalid(absl::StrCat("head_dim ", c.explicit_head_dim, " x num_heads ", c.num_heads,
                                  " != hidden_size ", c.hidden_size,
                                  " (only style llama may differ)"));
    }
    // The same as the derived one: not kept, so that the canonical JSON stays as before.
    if (c.explicit_head_dim * c.num_heads == c.hidden_size) c.explicit_head_dim = 0;
  } else if (c.hidden_size % c.num_heads != 0) {
    return Invalid(
        absl::StrCat("num_heads ", c.num_heads, " does not divide hidden_size ", c.hidden_size));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return Invalid(
        absl::StrCat("num_kv_heads ", c.num_kv_heads, " does not divide num_heads ", c.num_heads));
  }
  if (c.style == ModelStyle::kGpt && c.num_kv_heads != c.num_heads) {
    return Invalid(
        absl::StrCat("num_kv_heads ", c.num_kv_heads,
                     " differs from num_heads; grouped-query attention needs style llama"));
  }
  if (c.use_rope() && c.head_dim() % 2 != 0) {
    return Invalid(absl::StrCat("head dimension ", c.head_dim(), " must be even for RoPE"));
  }
  if (c.ffn_hidden_size == 0) {
    c.ffn_hidden_size =
        c.style == ModelStyle::kGpt ? 4 * c.hidden_size : (8 * c.hidden_size / 3 + 63) / 64 * 64;
  }
  RETURN_IF_ERROR(Positive(c.ffn_hidden_size, "ffn_hidden_size"));
  if (!(c.norm_eps > 0)) return Invalid(absl::StrCat("norm_eps must be > 0, got ", c.norm_eps));
  if (!(c.rope_theta > 0))
    return Invalid(absl::StrCat("rope_theta must be > 0, got ", c.rope_theta));
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    if (!c.use_rope()) return Invalid("rope_scaling is for style llama (gpt has no RoPE)");
    ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(j["rope_scaling"]));
  }
  if (j.contains("exits")) {
    if (!j["exits"].is_array()) return Invalid("exits must be a JSON array");
    int i = 0;
    for (const auto& e : j["exits"]) {
      ASSIGN_OR_RETURN(ExitConfig x, ParseExit(e, i++, c));
      c.exits.push_back(x);
    }
  }
  std::stable_sort(c.exits.begin(), c.exits.end(),
                   [](const ExitConfig& a, const ExitConfig& b) { return a.depth() < b.depth(); });
  for (size_t i = 1; i < c.exits.size(); ++i) {
    if (c.exits[i].depth() == c.exits[i - 1].depth()) {
      return Invalid(absl::StrCat("two exits read the same hidden state (layer ", c.exits[i].layer,
                                  "): a post-exit at layer L and a pre-exit at L+1 coincide"));
    }
  }
  return c;
}

bool SplitsOverTp(const ModelConfig& c, int tp) {
  return tp >= 1 && c.num_heads % tp == 0 &&
         (c.num_kv_heads % tp == 0 || tp % c.num_kv_heads == 0) && c.ffn_hidden_size % tp == 0 &&
         c.vocab_size % tp == 0;
}

ModelConfig LocalConfig(const ModelConfig& c, int tp) {
  EE_CHECK(c.tp_size == 1 && SplitsOverTp(c, tp), "model does not split over tp ", tp);
  ModelConfig l = c;
  l.num_heads /= tp;
  l.kv_replicas = c.num_kv_heads % tp == 0 ? 1 : tp / c.num_kv_heads;
  l.num_kv_heads = c.num_kv_heads % tp == 0 ? c.num_kv_heads / tp : 1;
  l.ffn_hidden_size /= tp;
  l.vocab_size /= tp;
  l.tp_size = tp;
  return l;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open model config ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  auto c = ParseModelConfig(ss.str());
  if (!c.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", c.status().message()));
  return c;
}

std::string ModelConfig::ToJson() const {
  json j;
  j["style"] = style == ModelStyle::kGpt ? "gpt" : "llama";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["num_layers"] = num_layers;
  j["num_heads"] = num_heads;
  j["num_kv_heads"] = num_kv_heads;
  if (explicit_head_dim > 0) j["head_dim"] = explicit_head_dim;  // (absent when derived)
  j["ffn_hidden_size"] = ffn_hidden_size;
  j["max_seq_len"] = max_seq_len;
  j["norm_eps"] = norm_eps;
  j["rope_theta"] = rope_theta;
  // (absent when plain: older checkpoints' configs match)
  const RopeScaling& s = rope_scaling;
  if (s.kind == RopeScalingKind::kLinear) {
    j["rope_scaling"] = {{"type", "linear"}, {"factor", s.factor}};
  } else if (s.kind == RopeScalingKind::kLlama3) {
    j["rope_scaling"] = {{"type", "llama3"},
                         {"factor", s.factor},
                         {"low_freq_factor", s.low_freq_factor},
                         {"high_freq_factor", s.high_freq_factor},
                         {"original_max_position_embeddings", s.original_max_positions}};
  }
  j["tie_embeddings"] = tie_embeddings;
  if (qkv_bias) j["qkv_bias"] = true;  // (absent when false: older checkpoints' configs match)
  if (qk_norm) j["qk_norm"] = true;
  j["confidence_weighted_exit_loss"] = confidence_weighted_exit_loss;
  j["exits"] = json::array();
  for (const auto& x : exits) {
    json e;
    e["layer"] = x.layer;
    e["kind"] = ExitKindName(x.kind);
    e["position"] = x.position == ExitPosition::kPost ? "post" : "pre";
    e["tied"] = x.tied;
    e["temperature"] = x.temperature;
    e["loss_weight"] = x.loss_weight;
    e["loss_weight_init"] = x.loss_weight_init;
    e["loss_weight_warmup_iters"] = x.loss_weight_warmup_iters;
    e["loss_weight_warmup"] = x.loss_weight_warmup == WarmupStyle::kLinear ? "linear" : "cosine";
    j["exits"].push_back(e);
  }
  return j.dump(2);
}

}  // namespace eellm
