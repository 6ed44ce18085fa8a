#include "launch/hf_convert.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/core/status.h"
#include "engine/tensor/param_store.h"
#include "models/layers.h"

namespace eellm {
namespace {

using nlohmann::json;

constexpr char kLlamaArch[] = "LlamaForCausalLM";
constexpr char kMistralArch[] = "MistralForCausalLM";
constexpr char kQwen2Arch[] = "Qwen2ForCausalLM";
constexpr char kQwen3Arch[] = "Qwen3ForCausalLM";
constexpr char kGpt2Arch[] = "GPT2LMHeadModel";

// ---- config ------------------------------------------------------------------------------------

absl::Status ConfigError(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("Hugging Face config: ", msg));
}

// Present and not null.
bool Has(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

absl::Status Missing(const char* key, const char* model_type) {
  return ConfigError(
      absl::StrCat("missing key \"", key, "\" (required for model_type \"", model_type, "\")"));
}

// Reads j[key] (when present and not null) into *out; a non-null `required_by` (the model type)
// makes the key required.
absl::Status GetInt(const json& j, const char* key, int* out, const char* required_by = nullptr) {
  if (!Has(j, key)) return required_by ? Missing(key, required_by) : absl::OkStatus();
  const json& v = j[key];
  if (!v.is_number_integer() || v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX) {
    return ConfigError(absl::StrCat("key \"", key, "\" must be an integer, got ", v.dump()));
  }
  *out = v.get<int>();
  return absl::OkStatus();
}

absl::Status GetFloat(const json& j, const char* key, float* out) {
  if (!Has(j, key)) return absl::OkStatus();
  if (!j[key].is_number()) {
    return ConfigError(absl::StrCat("key \"", key, "\" must be a number, got ", j[key].dump()));
  }
  *out = j[key].get<float>();
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const char* key, bool* out) {
  if (!Has(j, key)) return absl::OkStatus();
  if (!j[key].is_boolean()) {
    return ConfigError(
        absl::StrCat("key \"", key, "\" must be true or false, got ", j[key].dump()));
  }
  *out = j[key].get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const json& j, const char* key, std::string* out) {
  if (!Has(j, key)) return absl::OkStatus();
  if (!j[key].is_string()) {
    return ConfigError(absl::StrCat("key \"", key, "\" must be a string, got ", j[key].dump()));
  }
  *out = j[key].get<std::string>();
  return absl::OkStatus();
}

// A boolean key that eellm supports only at `supported`.
absl::Status RequireBool(const json& j, const char* key, bool supported, const char* why) {
  bool v = supported;
  RETURN_IF_ERROR(GetBool(j, key, &v));
  if (v != supported) {
    return ConfigError(
        absl::StrCat("\"", key, "\": ", v ? "true" : "false", " is not supported (", why, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckArchitectures(const json& j, const char* expected) {
  if (!Has(j, "architectures")) return absl::OkStatus();
  const json& a = j["architectures"];
  if (!a.is_array())
    return ConfigError(absl::StrCat("\"architectures\" must be a list: ", a.dump()));
  for (const json& x : a) {
    if (!x.is_string() || x.get<std::string>() != expected) {
      return ConfigError(absl::StrCat("architectures ", a.dump(), " is not supported (expected [\"",
                                      expected, "\"])"));
    }
  }
  return absl::OkStatus();
}

// eellm rotates every dimension of a head: partial_rotary_factor (top level, or in
// rope_parameters) must be absent or 1.
absl::Status RequireWholeHeadRotated(const json& j) {
  float partial = 1.0f;
  RETURN_IF_ERROR(GetFloat(j, "partial_rotary_factor", &partial));
  if (partial != 1.0f) {
    return ConfigError(absl::StrCat("partial_rotary_factor ", partial,
                                    " is not supported (eellm rotates the whole head)"));
  }
  return absl::OkStatus();
}

// rope_scaling / rope_parameters: the plain RoPE (absent, null, or rope_type "default"), or
// the "linear" or "llama3" (Llama 3.1 and later) scaling, written to *scaling as eellm's
// "rope_scaling". Reads rope_theta from it when there (transformers 5 keeps it in
// rope_parameters).
absl::Status ReadRope(const json& j, const char* key, float* theta, json* scaling) {
  if (!Has(j, key)) return absl::OkStatus();
  const json& r = j[key];
  std::string type;
  if (r.is_object()) {
    for (const char* k : {"type", "rope_type"}) {  // rope_type wins: "type" is the older name
      if (r.contains(k) && r[k].is_string()) type = r[k].get<std::string>();
    }
  }
  if (type != "default" && type != "linear" && type != "llama3") {
    return ConfigError(absl::StrCat("\"", key, "\": ", r.dump(),
                                    " is not supported (the default RoPE, or linear or llama3 "
                                    "scaling)"));
  }
  if (r.contains("rope_theta")) RETURN_IF_ERROR(GetFloat(r, "rope_theta", theta));
  RETURN_IF_ERROR(RequireWholeHeadRotated(r));
  if (type == "default") return absl::OkStatus();
  json s = {{"type", type}};
  std::vector<const char*> keys = {"factor"};
  if (type == "llama3") {
    keys.insert(keys.end(),
                {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"});
  }
  for (const char* k : keys) {
    if (!Has(r, k)) return ConfigError(absl::StrCat("\"", key, "\" needs ", k, ": ", r.dump()));
    if (!r[k].is_number()) {
      return ConfigError(absl::StrCat("\"", key, "\" ", k, " must be a number: ", r.dump()));
    }
    s[k] = r[k];
  }
  // transformers 5 keeps the scaling in rope_parameters; rope_scaling beside it must agree.
  if (!scaling->is_null() && *scaling != s) {
    return ConfigError(absl::StrCat("rope_parameters and rope_scaling scale RoPE differently: ",
                                    scaling->dump(), " and ", s.dump()));
  }
  *scaling = s;
  return absl::OkStatus();
}

// Llama; Mistral (Llama's architecture with sliding-window attention: the context is cut to the
// window, within which attention is the same); Qwen2 (Llama's with biases on q, k and v, and a
// sliding window only when use_sliding_window).
absl::Status LlamaToEellm(const json& hf, const std::string& model_type, json& e) {
  const char* mt = model_type.c_str();
  const bool mistral = model_type == "mistral", qwen2 = model_type == "qwen2",
             qwen3 = model_type == "qwen3";
  RETURN_IF_ERROR(CheckArchitectures(
      hf, mistral ? kMistralArch : (qwen3 ? kQwen3Arch : (qwen2 ? kQwen2Arch : kLlamaArch))));
  int hidden = 0, ffn = 0, layers = 0, heads = 0, vocab = 0, max_pos = 0;
  RETURN_IF_ERROR(GetInt(hf, "hidden_size", &hidden, mt));
  RETURN_IF_ERROR(GetInt(hf, "intermediate_size", &ffn, mt));
  RETURN_IF_ERROR(GetInt(hf, "num_hidden_layers", &layers, mt));
  RETURN_IF_ERROR(GetInt(hf, "num_attention_heads", &heads, mt));
  RETURN_IF_ERROR(GetInt(hf, "vocab_size", &vocab, mt));
  RETURN_IF_ERROR(GetInt(hf, "max_position_embeddings", &max_pos, mt));
  // Mistral windows every layer; Qwen2 and Qwen3 the layers from max_window_layers on, when
  // use_sliding_window. An absent sliding_window is transformers' default, 4096; null is none.
  bool windowed = mistral;
  if (qwen2 || qwen3) {
    RETURN_IF_ERROR(GetBool(hf, "use_sliding_window", &windowed));
    int first_windowed = 28;  // Qwen2Config's max_window_layers default
    RETURN_IF_ERROR(GetInt(hf, "max_window_layers", &first_windowed));
    windowed = windowed && first_windowed < layers;
  }
  if (windowed && (!hf.contains("sliding_window") || Has(hf, "sliding_window"))) {
    int window = 4096;
    RETURN_IF_ERROR(GetInt(hf, "sliding_window", &window));
    if (window < 1) {
      return ConfigError(absl::StrCat("sliding_window ", window, " must be positive or null"));
    }
    max_pos = std::min(max_pos, window);
  }
  int kv_heads = heads;
  RETURN_IF_ERROR(GetInt(hf, "num_key_value_heads", &kv_heads));
  float eps = 1e-6f, theta = 10000.0f;
  RETURN_IF_ERROR(GetFloat(hf, "rms_norm_eps", &eps));
  json scaling;  // null: none
  RETURN_IF_ERROR(RequireWholeHeadRotated(hf));
  RETURN_IF_ERROR(ReadRope(hf, "rope_parameters", &theta, &scaling));
  RETURN_IF_ERROR(ReadRope(hf, "rope_scaling", &theta, &scaling));
  RETURN_IF_ERROR(GetFloat(hf, "rope_theta", &theta));
  bool tied = false;
  RETURN_IF_ERROR(GetBool(hf, "tie_word_embeddings", &tied));
  std::string act = "silu";
  RETURN_IF_ERROR(GetString(hf, "hidden_act", &act));
  if (act != "silu") {
    return ConfigError(absl::StrCat("hidden_act \"", act, "\" is not supported (only silu)"));
  }
  RETURN_IF_ERROR(RequireBool(hf, "attention_bias", false, "eellm's Llama has no biases"));
  RETURN_IF_ERROR(RequireBool(hf, "mlp_bias", false, "eellm's Llama has no biases"));
  // 0: hidden_size / num_attention_heads; transformers' Qwen3Config defaults to 128.
  int head_dim = qwen3 ? 128 : 0;
  RETURN_IF_ERROR(GetInt(hf, "head_dim", &head_dim));
  e["style"] = "llama";
  if (qwen2) e["qkv_bias"] = true;
  if (qwen3) e["qk_norm"] = true;
  e["hidden_size"] = hidden;
  e["ffn_hidden_size"] = ffn;
  e["num_layers"] = layers;
  e["num_heads"] = heads;
  e["num_kv_heads"] = kv_heads;
  if (head_dim != 0) e["head_dim"] = head_dim;
  e["vocab_size"] = vocab;
  e["max_seq_len"] = max_pos;
  e["norm_eps"] = eps;
  e["rope_theta"] = theta;
  if (!scaling.is_null()) e["rope_scaling"] = scaling;
  e["tie_embeddings"] = tied;
  return absl::OkStatus();
}

absl::Status Gpt2ToEellm(const json& hf, json& e) {
  const char* mt = "gpt2";
  RETURN_IF_ERROR(CheckArchitectures(hf, kGpt2Arch));
  int hidden = 0, layers = 0, heads = 0, vocab = 0, max_pos = 0;
  RETURN_IF_ERROR(GetInt(hf, "n_embd", &hidden, mt));
  RETURN_IF_ERROR(GetInt(hf, "n_layer", &layers, mt));
  RETURN_IF_ERROR(GetInt(hf, "n_head", &heads, mt));
  RETURN_IF_ERROR(GetInt(hf, "vocab_size", &vocab, mt));
  RETURN_IF_ERROR(GetInt(hf, "n_positions", &max_pos, mt));
  int ffn = 4 * hidden;
  RETURN_IF_ERROR(GetInt(hf, "n_inner", &ffn));
  float eps = 1e-5f;
  RETURN_IF_ERROR(GetFloat(hf, "layer_norm_epsilon", &eps));
  bool tied = true;
  RETURN_IF_ERROR(GetBool(hf, "tie_word_embeddings", &tied));
  std::string act = "gelu_new";
  RETURN_IF_ERROR(GetString(hf, "activation_function", &act));
  if (act != "gelu_new" && act != "gelu_pytorch_tanh") {
    return ConfigError(absl::StrCat("activation_function \"", act,
                                    "\" is not supported (gelu_new or gelu_pytorch_tanh: eellm's "
                                    "GELU is the tanh approximation)"));
  }
  RETURN_IF_ERROR(
      RequireBool(hf, "scale_attn_weights", true, "eellm scales attention by 1/sqrt(head_dim)"));
  RETURN_IF_ERROR(RequireBool(hf, "scale_attn_by_inverse_layer_idx", false,
                              "eellm scales attention by 1/sqrt(head_dim) only"));
  RETURN_IF_ERROR(RequireBool(hf, "add_cross_attention", false, "decoder-only models only"));
  e["style"] = "gpt";
  e["hidden_size"] = hidden;
  e["ffn_hidden_size"] = ffn;
  e["num_layers"] = layers;
  e["num_heads"] = heads;
  e["vocab_size"] = vocab;
  e["max_seq_len"] = max_pos;
  e["norm_eps"] = eps;
  e["tie_embeddings"] = tied;
  return absl::OkStatus();
}

// The shortest decimal that reads back as `f` (1e-5f -> 1e-05, not 9.99999974737875e-06).
double ShortestDecimal(float f) {
  char buf[40];
  for (int p = 1; p <= 9; ++p) {
    std::snprintf(buf, sizeof(buf), "%.*g", p, static_cast<double>(f));
    const double d = std::strtod(buf, nullptr);
    if (static_cast<float>(d) == f) return d;
  }
  return f;
}

// Rewrites every float in `j` (all of them float-valued, from ModelConfig::ToJson) shortest.
void ShortenFloats(json& j) {
  if (j.is_number_float()) {
    j = ShortestDecimal(j.get<float>());
  } else if (j.is_structured()) {
    for (auto& v : j) ShortenFloats(v);
  }
}

// ---- tensors -----------------------------------------------------------------------------------

// How one HF tensor relates to eellm tensors.
enum class Op {
  kSame,            // same layout
  kTranspose,       // Conv1D weight [in, out] <-> Linear weight [out, in]
  kFusedQkvWeight,  // Conv1D c_attn [in, q + 2 kv] <-> wq [q, in], wk [kv, in], wv [kv, in]
  kFusedQkvBias,    // [q + 2 kv] <-> bq [q], bk [kv], bv [kv]
};

struct HfTensorSpec {
  std::string hf;
  Shape hf_shape;
  Op op;
  std::vector<std::string> eellm;  // one name; q, k, v for the fused ops
};

using ShapeMap = std::map<std::string, Shape>;

ShapeMap EellmShapeMap(const ModelConfig& c) {
  ShapeMap m;
  for (auto& [name, shape] : EellmParamShapes(c)) m[name] = shape;
  return m;
}

// Every HF tensor of the model for `c`, in a deterministic order. Fails (Internal) if the
// layout does not cover the model's parameters exactly once (the model code changed).
absl::StatusOr<std::vector<HfTensorSpec>> HfLayout(const ModelConfig& c, const ShapeMap& shapes) {
  std::vector<HfTensorSpec> specs;
  std::map<std::string, int> covered;
  absl::Status missing = absl::OkStatus();
  auto shape_of = [&](const std::string& name) -> Shape {
    auto it = shapes.find(name);
    if (it == shapes.end()) {
      if (missing.ok()) missing = absl::InternalError("converter expects eellm tensor " + name);
      return {};
    }
    ++covered[name];
    return it->second;
  };
  auto same = [&](const std::string& hf, const std::string& e) {
    specs.push_back({hf, shape_of(e), Op::kSame, {e}});
  };
  auto transposed = [&](const std::string& hf, const std::string& e) {
    Shape s = shape_of(e);
    if (s.size() == 2) std::swap(s[0], s[1]);
    specs.push_back({hf, s, Op::kTranspose, {e}});
  };
  if (c.style == ModelStyle::kLlama) {
    same("model.embed_tokens.weight", "embedding.word.weight");
    for (int i = 0; i < c.num_layers; ++i) {
      const std::string h = absl::StrCat("model.layers.", i, "."),
                        e = absl::StrCat("layers.", i, ".");
      same(h + "input_layernorm.weight", e + "attn_norm.weight");
      same(h + "self_attn.q_proj.weight", e + "attn.wq.weight");
      same(h + "self_attn.k_proj.weight", e + "attn.wk.weight");
      same(h + "self_attn.v_proj.weight", e + "attn.wv.weight");
      if (c.qkv_bias) {
        same(h + "self_attn.q_proj.bias", e + "attn.wq.bias");
        same(h + "self_attn.k_proj.bias", e + "attn.wk.bias");
        same(h + "self_attn.v_proj.bias", e + "attn.wv.bias");
      }
      if (c.qk_norm) {
        same(h + "self_attn.q_norm.weight", e + "attn.q_norm.weight");
        same(h + "self_attn.k_norm.weight", e + "attn.k_norm.weight");
      }
      same(h + "self_attn.o_proj.weight", e + "attn.wo.weight");
      same(h + "post_attention_layernorm.weight", e + "mlp_norm.weight");
      same(h + "mlp.gate_proj.weight", e + "mlp.fc1.weight");
      same(h + "mlp.up_proj.weight", e + "mlp.up.weight");
      same(h + "mlp.down_proj.weight", e + "mlp.fc2.weight");
    }
    same("model.norm.weight", "final_norm.weight");
  } else {
    same("transformer.wte.weight", "embedding.word.weight");
    same("transformer.wpe.weight", "embedding.position.weight");
    for (int i = 0; i < c.num_layers; ++i) {
      const std::string h = absl::StrCat("transformer.h.", i, "."),
                        e = absl::StrCat("layers.", i, ".");
      same(h + "ln_1.weight", e + "attn_norm.weight");
      same(h + "ln_1.bias", e + "attn_norm.bias");
      const std::vector<std::string> w = {e + "attn.wq.weight", e + "attn.wk.weight",
                                          e + "attn.wv.weight"};
      const std::vector<std::string> b = {e + "attn.wq.bias", e + "attn.wk.bias",
                                          e + "attn.wv.bias"};
      int64_t out = 0;
      for (const auto& n : w) {
        const Shape s = shape_of(n);
        out += s.empty() ? 0 : s[0];
      }
      for (const auto& n : b) shape_of(n);
      specs.push_back({h + "attn.c_attn.weight", {c.hidden_size, out}, Op::kFusedQkvWeight, w});
      specs.push_back({h + "attn.c_attn.bias", {out}, Op::kFusedQkvBias, b});
      transposed(h + "attn.c_proj.weight", e + "attn.wo.weight");
      same(h + "attn.c_proj.bias", e + "attn.wo.bias");
      same(h + "ln_2.weight", e + "mlp_norm.weight");
      same(h + "ln_2.bias", e + "mlp_norm.bias");
      transposed(h + "mlp.c_fc.weight", e + "mlp.fc1.weight");
      same(h + "mlp.c_fc.bias", e + "mlp.fc1.bias");
      transposed(h + "mlp.c_proj.weight", e + "mlp.fc2.weight");
      same(h + "mlp.c_proj.bias", e + "mlp.fc2.bias");
    }
    same("transformer.ln_f.weight", "final_norm.weight");
    same("transformer.ln_f.bias", "final_norm.bias");
  }
  if (!c.tie_embeddings) same("lm_head.weight", "output.weight");
  for (const auto& [name, shape] : shapes) {
    if (absl::StartsWith(name, "exits.")) same(kHfEellmTensorPrefix + name, name);
  }
  RETURN_IF_ERROR(missing);
  for (const auto& [name, shape] : shapes) {
    if (covered[name] != 1) {
      return absl::InternalError(
          absl::StrCat("converter covers eellm tensor ", name, " ", covered[name], " times"));
    }
  }
  return specs;
}

// Buffers and duplicates HF files hold besides the parameters (canonical names).
bool IsIgnorableHf(const ModelConfig& c, const std::string& name) {
  if (name == "lm_head.weight") return c.tie_embeddings;
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  int layer = -1;
  if (c.style == ModelStyle::kGpt) {
    // transformer.h.{i}.attn.bias / .masked_bias: the causal mask.
    if (parts.size() != 5 || parts[0] != "transformer" || parts[1] != "h" || parts[3] != "attn" ||
        (parts[4] != "bias" && parts[4] != "masked_bias")) {
      return false;
    }
    if (!absl::SimpleAtoi(parts[2], &layer)) return false;
  } else {
    // model.layers.{i}.self_attn.rotary_emb.inv_freq: RoPE frequencies (old transformers).
    if (parts.size() != 6 || parts[0] != "model" || parts[1] != "layers" ||
        parts[3] != "self_attn" || parts[4] != "rotary_emb" || parts[5] != "inv_freq") {
      return false;
    }
    if (!absl::SimpleAtoi(parts[2], &layer)) return false;
  }
  return layer >= 0 && layer < c.num_layers;
}

// GPT2Model files name tensors without "transformer.": the canonical name has it.
std::string CanonicalHfName(const ModelConfig& c, const std::string& name) {
  if (c.style != ModelStyle::kGpt || absl::StartsWith(name, "transformer.") ||
      absl::StartsWith(name, "lm_head.") || absl::StartsWith(name, kHfEellmTensorPrefix)) {
    return name;
  }
  return "transformer." + name;
}

// dst[n, rows] = src[:, c0 : c0 + n]^T, src [rows, cols].
std::vector<float> ColumnsTransposed(const std::vector<float>& src, int64_t rows, int64_t cols,
                                     int64_t c0, int64_t n) {
  std::vector<float> dst(static_cast<size_t>(n * rows));
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = src[i * cols + c0 + j];
  }
  return dst;
}

// dst[:, c0 : c0 + n] = src^T, src [n, rows], dst [rows, cols].
void SetColumnsTransposed(std::vector<float>& dst, int64_t cols, const std::vector<float>& src,
                          int64_t rows, int64_t c0, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[i * cols + c0 + j] = src[j * rows + i];
  }
}

absl::Status CheckTensorData(const std::string& what, const std::string& name,
                             const HostTensor& t) {
  if (static_cast<int64_t>(t.data.size()) != NumElements(t.shape)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " tensor \"", name, "\" has shape ",
                                                   ShapeToString(t.shape), " but ", t.data.size(),
                                                   " values"));
  }
  return absl::OkStatus();
}

std::string NameList(const std::vector<std::string>& names) {
  constexpr size_t kShown = 8;
  std::vector<std::string> quoted;
  for (size_t i = 0; i < names.size() && i < kShown; ++i) quoted.push_back("\"" + names[i] + "\"");
  std::string s = absl::StrJoin(quoted, ", ");
  if (names.size() > kShown) absl::StrAppend(&s, " and ", names.size() - kShown, " more");
  return s;
}

const char* StyleName(const ModelConfig& c) {
  return c.style == ModelStyle::kLlama ? "Llama" : "GPT-2";
}

// eellm's rope_scaling as transformers writes it (null when plain).
json HfRopeScaling(const RopeScaling& s) {
  if (s.kind == RopeScalingKind::kNone) return nullptr;
  json r = {{"rope_type", s.kind == RopeScalingKind::kLinear ? "linear" : "llama3"},
            {"factor", ShortestDecimal(s.factor)}};
  if (s.kind == RopeScalingKind::kLlama3) {
    r["low_freq_factor"] = ShortestDecimal(s.low_freq_factor);
    r["high_freq_factor"] = ShortestDecimal(s.high_freq_factor);
    r["original_max_position_embeddings"] = s.original_max_positions;
  }
  return r;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromHf(const json& hf) {
  if (!hf.is_object()) return ConfigError("config.json must be a JSON object");
  std::string model_type;
  RETURN_IF_ERROR(GetString(hf, "model_type", &model_type));
  if (model_type.empty()) {
    return ConfigError("missing key \"model_type\" (llama, mistral, qwen2, qwen3 or gpt2)");
  }
  json e = json::object();
  if (model_type == "llama" || model_type == "mistral" || model_type == "qwen2" ||
      model_type == "qwen3") {
    RETURN_IF_ERROR(LlamaToEellm(hf, model_type, e));
  } else if (model_type == "gpt2") {
    RETURN_IF_ERROR(Gpt2ToEellm(hf, e));
  } else {
    return ConfigError(absl::StrCat("model_type \"", model_type,
                                    "\" is not supported (llama, mistral, qwen2, qwen3 or gpt2)"));
  }
  if (Has(hf, kHfExitsKey)) {
    if (!hf[kHfExitsKey].is_array()) {
      return ConfigError(
          absl::StrCat("\"", kHfExitsKey, "\" must be a list, got ", hf[kHfExitsKey].dump()));
    }
    e["exits"] = hf[kHfExitsKey];
  }
  bool confidence_weighted = false;
  RETURN_IF_ERROR(GetBool(hf, kHfConfidenceWeightedKey, &confidence_weighted));
  e["confidence_weighted_exit_loss"] = confidence_weighted;
  auto c = ParseModelConfig(e.dump());
  if (!c.ok()) return ConfigError(std::string(c.status().message()));
  return c;
}

json HfConfigFromModel(const ModelConfig& c) {
  json j = json::object();
  const bool llama = c.style == ModelStyle::kLlama, qwen3 = llama && c.qk_norm;
  const bool qwen2 = llama && c.qkv_bias && !qwen3;
  j["architectures"] =
      json::array({qwen3 ? kQwen3Arch : (qwen2 ? kQwen2Arch : (llama ? kLlamaArch : kGpt2Arch))});
  j["model_type"] = qwen3 ? "qwen3" : (qwen2 ? "qwen2" : (llama ? "llama" : "gpt2"));
  j["torch_dtype"] = "float32";
  j["vocab_size"] = c.vocab_size;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  if (llama) {
    j["hidden_size"] = c.hidden_size;
    j["intermediate_size"] = c.ffn_hidden_size;
    j["num_hidden_layers"] = c.num_layers;
    j["num_attention_heads"] = c.num_heads;
    j["num_key_value_heads"] = c.num_kv_heads;
    j["head_dim"] = c.head_dim();
    j["hidden_act"] = "silu";
    j["max_position_embeddings"] = c.max_seq_len;
    j["rms_norm_eps"] = ShortestDecimal(c.norm_eps);
    j["rope_theta"] = ShortestDecimal(c.rope_theta);
    j["rope_scaling"] = HfRopeScaling(c.rope_scaling);
    j["attention_dropout"] = 0.0;
    if (qwen2 || qwen3) {  // Qwen2: biases on q, k, v by construction; Qwen3: none
      j["use_sliding_window"] = false;
      // Some transformers versions window by sliding_window (default 4096) even so.
      j["sliding_window"] = nullptr;
      j["max_window_layers"] = c.num_layers;
      if (qwen3) j["attention_bias"] = false;
    } else {
      j["attention_bias"] = false;
      j["mlp_bias"] = false;
      j["pretraining_tp"] = 1;
    }
  } else {
    j["n_embd"] = c.hidden_size;
    j["n_inner"] = c.ffn_hidden_size;
    j["n_layer"] = c.num_layers;
    j["n_head"] = c.num_heads;
    j["n_positions"] = c.max_seq_len;
    j["layer_norm_epsilon"] = ShortestDecimal(c.norm_eps);
    j["activation_function"] = "gelu_new";
    // eellm trains without dropout; HF's GPT-2 defaults are 0.1.
    j["resid_pdrop"] = 0.0;
    j["embd_pdrop"] = 0.0;
    j["attn_pdrop"] = 0.0;
    j["scale_attn_weights"] = true;
    j["scale_attn_by_inverse_layer_idx"] = false;
    j["reorder_and_upcast_attn"] = false;
  }
  if (!c.exits.empty()) {
    json exits = json::parse(c.ToJson())["exits"];
    ShortenFloats(exits);
    j[kHfExitsKey] = exits;
  }
  if (c.confidence_weighted_exit_loss) j[kHfConfidenceWeightedKey] = true;
  return j;
}

std::vector<std::pair<std::string, Shape>> EellmParamShapes(const ModelConfig& c) {
  EE_CHECK(c.tp_size == 1, "EellmParamShapes needs the whole model's config, not a tp share");
  // Mirrors Model::DeclareParams for one stage and tp = 1; the per-layer names come from the
  // same AddBlockParams / AddMlpParams / AddNormParams the model uses.
  ParamStore ps;
  ps.Add("embedding.word.weight", {c.vocab_size, c.hidden_size}, true);
  if (c.learned_positions()) {
    ps.Add("embedding.position.weight", {c.max_seq_len, c.hidden_size}, true);
  }
  for (int l = 0; l < c.num_layers; ++l) AddBlockParams(ps, c, absl::StrCat("layers.", l, "."));
  AddNormParams(ps, c, "final_norm");
  if (!c.tie_embeddings) ps.Add("output.weight", {c.vocab_size, c.hidden_size}, true);
  for (size_t i = 0; i < c.exits.size(); ++i) {
    const ExitConfig& x = c.exits[i];
    const std::string prefix = absl::StrCat("exits.", i, ".");
    if (x.kind == ExitKind::kMlp) AddMlpParams(ps, c, prefix);
    if (x.kind == ExitKind::kBlock) AddBlockParams(ps, c, prefix + "block.");
    if (x.kind != ExitKind::kLinear) AddNormParams(ps, c, prefix + "norm");
    if (!x.tied) ps.Add(prefix + "head.weight", {c.vocab_size, c.hidden_size}, true);
  }
  std::vector<std::pair<std::string, Shape>> r;
  for (const ParamInfo& p : ps.params()) r.emplace_back(p.name, p.shape);
  return r;
}

absl::StatusOr<HostTensorMap> HfToEellm(const ModelConfig& c, HostTensorMap hf) {
  const ShapeMap shapes = EellmShapeMap(c);
  ASSIGN_OR_RETURN(std::vector<HfTensorSpec> specs, HfLayout(c, shapes));
  // Canonical name -> tensor, remembering the name as given for messages.
  std::map<std::string, std::string> given;
  HostTensorMap in;
  for (auto& [name, t] : hf) {
    RETURN_IF_ERROR(CheckTensorData("Hugging Face", name, t));
    const std::string canon = CanonicalHfName(c, name);
    if (!given.emplace(canon, name).second) {
      return absl::InvalidArgumentError(absl::StrCat("Hugging Face tensors \"", given[canon],
                                                     "\" and \"", name, "\" are the same tensor"));
    }
    in[canon] = std::move(t);
  }
  HostTensorMap out;
  for (const HfTensorSpec& s : specs) {
    auto it = in.find(s.hf);
    if (it == in.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Hugging Face tensor \"", s.hf, "\" is missing (expected shape ",
          ShapeToString(s.hf_shape), ", ", StyleName(c), " model with ", c.num_layers, " layers)"));
    }
    HostTensor& t = it->second;
    if (t.shape != s.hf_shape) {
      return absl::InvalidArgumentError(absl::StrCat("Hugging Face tensor \"", given[s.hf],
                                                     "\" has shape ", ShapeToString(t.shape),
                                                     ", expected ", ShapeToString(s.hf_shape)));
    }
    switch (s.op) {
      case Op::kSame:
        out[s.eellm[0]] = std::move(t);
        break;
      case Op::kTranspose:
        out[s.eellm[0]] = {shapes.at(s.eellm[0]),
                           ColumnsTransposed(t.data, t.shape[0], t.shape[1], 0, t.shape[1])};
        break;
      case Op::kFusedQkvWeight: {
        int64_t c0 = 0;
        for (const std::string& e : s.eellm) {
          const Shape& es = shapes.at(e);
          out[e] = {es, ColumnsTransposed(t.data, t.shape[0], t.shape[1], c0, es[0])};
          c0 += es[0];
        }
        break;
      }
      case Op::kFusedQkvBias: {
        int64_t c0 = 0;
        for (const std::string& e : s.eellm) {
          const Shape& es = shapes.at(e);
          out[e] = {es, std::vector<float>(t.data.begin() + c0, t.data.begin() + c0 + es[0])};
          c0 += es[0];
        }
        break;
      }
    }
    in.erase(it);
  }
  std::vector<std::string> unexpected;
  for (const auto& [canon, t] : in) {
    if (!IsIgnorableHf(c, canon)) unexpected.push_back(given[canon]);
  }
  if (!unexpected.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unexpected Hugging Face tensor(s) ", NameList(unexpected), " (not part of a ",
        StyleName(c), " model with ", c.num_layers, " layers and ", c.exits.size(), " exits)"));
  }
  return out;
}

absl::StatusOr<HostTensorMap> EellmToHf(const ModelConfig& c, HostTensorMap eellm) {
  if (c.qk_norm && c.qkv_bias) {
    return absl::InvalidArgumentError(
        "qk_norm with qkv_bias has no Hugging Face architecture (Qwen3's attention_bias also "
        "biases o_proj)");
  }
  const ShapeMap shapes = EellmShapeMap(c);
  ASSIGN_OR_RETURN(std::vector<HfTensorSpec> specs, HfLayout(c, shapes));
  for (const auto& [name, shape] : shapes) {
    auto it = eellm.find(name);
    if (it == eellm.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "eellm tensor \"", name, "\" is missing (expected shape ", ShapeToString(shape), ")"));
    }
    RETURN_IF_ERROR(CheckTensorData("eellm", name, it->second));
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat("eellm tensor \"", name, "\" has shape ",
                                                     ShapeToString(it->second.shape), ", expected ",
                                                     ShapeToString(shape)));
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : eellm) {
    if (!shapes.count(name)) unexpected.push_back(name);
  }
  if (!unexpected.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("unexpected eellm tensor(s) ",
                                                   NameList(unexpected),
                                                   " (not parameters of the model config)"));
  }
  HostTensorMap out;
  for (const HfTensorSpec& s : specs) {
    HostTensor& h = out[s.hf];
    h.shape = s.hf_shape;
    switch (s.op) {
      case Op::kSame:
        h.data = std::move(eellm[s.eellm[0]].data);
        break;
      case Op::kTranspose: {
        const HostTensor& e = eellm[s.eellm[0]];
        h.data = ColumnsTransposed(e.data, e.shape[0], e.shape[1], 0, e.shape[1]);
        break;
      }
      case Op::kFusedQkvWeight: {
        h.data.assign(static_cast<size_t>(NumElements(h.shape)), 0.0f);
        int64_t c0 = 0;
        for (const std::string& name : s.eellm) {
          const HostTensor& e = eellm[name];
          SetColumnsTransposed(h.data, h.shape[1], e.data, e.shape[1], c0, e.shape[0]);
          c0 += e.shape[0];
        }
        break;
      }
      case Op::kFusedQkvBias:
        for (const std::string& name : s.eellm) {
          const HostTensor& e = eellm[name];
          h.data.insert(h.data.end(), e.data.begin(), e.data.end());
        }
        break;
    }
  }
  return out;
}

}  // namespace eellm
