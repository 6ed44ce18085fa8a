// Hugging Face <-> eellm conversion: config and tensor round trips, GPT-2's Conv1D layout, the
// logits of converted models against a reference forward pass written from the HF tensors, and
// the errors.
#include "launch/hf_convert.h"

#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "launch/exit_surgery.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using nlohmann::json;
using testing::Cpu;

ExitConfig Exit(int layer, ExitKind kind, ExitPosition pos, bool tied = false) {
  ExitConfig x;
  x.layer = layer;
  x.kind = kind;
  x.position = pos;
  x.tied = tied;
  return x;
}

// Llama with GQA (4 heads, 2 KV heads) and one exit of every kind.
ModelConfig LlamaConfig(bool with_exits = true) {
  ModelConfig c;
  c.style = ModelStyle::kLlama;
  c.vocab_size = 23;
  c.hidden_size = 16;
  c.num_layers = 4;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 24;
  c.max_seq_len = 16;
  c.norm_eps = 1e-5f;
  c.rope_theta = 500.0f;
  c.tie_embeddings = false;
  if (with_exits) {
    c.exits = {Exit(1, ExitKind::kLinear, ExitPosition::kPre),
               Exit(1, ExitKind::kNorm, ExitPosition::kPost, /*tied=*/true),
               Exit(2, ExitKind::kMlp, ExitPosition::kPost),
               Exit(4, ExitKind::kBlock, ExitPosition::kPre)};
    c.exits[1].temperature = 0.7f;
    c.exits[2].loss_weight = 0.3f;
    c.exits[2].loss_weight_init = 0.1f;
    c.exits[2].loss_weight_warmup_iters = 50;
    c.exits[2].loss_weight_warmup = WarmupStyle::kCosine;
  }
  return c;
}

ModelConfig GptConfig(bool with_exits = true, bool tied = true) {
  ModelConfig c;
  c.style = ModelStyle::kGpt;
  c.vocab_size = 19;
  c.hidden_size = 12;
  c.num_layers = 3;
  c.num_heads = 3;
  c.num_kv_heads = 3;
  c.ffn_hidden_size = 20;
  c.max_seq_len = 16;
  c.tie_embeddings = tied;
  if (with_exits) {
    c.exits = {Exit(1, ExitKind::kBlock, ExitPosition::kPre),
               Exit(1, ExitKind::kMlp, ExitPosition::kPost, /*tied=*/true),
               Exit(2, ExitKind::kNorm, ExitPosition::kPost)};
  }
  return c;
}

std::unique_ptr<Model> RandomModel(const ModelConfig& c, Backend* be, uint64_t seed) {
  auto m = Model::Create(c, be);
  EXPECT_TRUE(m.ok()) << m.status();
  testing::FillParams(**m, seed, 0.3f);
  return std::move(*m);
}

std::unique_ptr<Model> ModelFrom(const ModelConfig& c, const HostTensorMap& t, Backend* be) {
  auto m = Model::Create(c, be);
  EXPECT_TRUE(m.ok()) << m.status();
  absl::Status s = HostToParams(t, (*m)->params());
  EXPECT_TRUE(s.ok()) << s;
  return std::move(*m);
}

void ExpectSameTensors(const HostTensorMap& a, const HostTensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_NE(it, b.end()) << name;
    EXPECT_EQ(t.shape, it->second.shape) << name;
    EXPECT_EQ(t.data, it->second.data) << name;  // bit-exact
  }
}

// Qwen2: Llama with biases on q, k and v, tied embeddings (as its small models).
ModelConfig Qwen2Config() {
  ModelConfig c = LlamaConfig();
  c.qkv_bias = true;
  c.tie_embeddings = true;
  c.rope_theta = 1e6f;
  return c;
}

// Llama 3.1 / 3.2 style: "llama3" RoPE scaling, tied embeddings (as 3.2 1B and 3B). Head
// size 8: its 4 pairs' wavelengths are 6.3, 30, 140 and 660 tokens, so pair 0 is kept (under
// 64 / 4), pair 1 blended and pairs 2-3 divided by 8 (over 64 / 0.5).
ModelConfig Llama3Config() {
  ModelConfig c = LlamaConfig();
  c.hidden_size = 32;
  c.tie_embeddings = true;
  c.rope_scaling = {RopeScalingKind::kLlama3, 8.0f, 0.5f, 4.0f, 64};
  return c;
}

// Heads wider than hidden_size / num_heads (as Qwen3's and Mistral Nemo's): q is 4 x 8 = 32
// wide over a hidden size of 16.
ModelConfig WideHeadConfig() {
  ModelConfig c = LlamaConfig();
  c.explicit_head_dim = 8;
  return c;
}

// Qwen3: q and k norms per head, heads of 8 over a hidden size of 16, tied embeddings.
ModelConfig Qwen3Config() {
  ModelConfig c = WideHeadConfig();
  c.qk_norm = true;
  c.tie_embeddings = true;
  c.rope_theta = 1e6f;
  return c;
}

std::vector<ModelConfig> AllConfigs() {
  ModelConfig llama_tied = LlamaConfig();
  llama_tied.tie_embeddings = true;
  return {LlamaConfig(),          llama_tied,       LlamaConfig(false), Qwen2Config(),
          Llama3Config(),         WideHeadConfig(), Qwen3Config(),      GptConfig(),
          GptConfig(true, false), GptConfig(false)};
}

TEST(HfConvertTest, ParamShapesMatchTheModel) {
  auto be = Cpu();
  for (const ModelConfig& c : AllConfigs()) {
    auto m = Model::Create(c, be.get());
    ASSERT_TRUE(m.ok());
    const auto shapes = EellmParamShapes(c);
    const auto& params = (*m)->params().params();
    ASSERT_EQ(shapes.size(), params.size()) << c.ToJson();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(shapes[i].first, params[i].name);
      EXPECT_EQ(shapes[i].second, params[i].shape) << params[i].name;
    }
  }
}

TEST(HfConvertTest, TensorRoundTripIsBitExact) {
  auto be = Cpu();
  for (const ModelConfig& c : AllConfigs()) {
    SCOPED_TRACE(c.ToJson());
    auto a = RandomModel(c, be.get(), 5);
    const HostTensorMap host = ParamsToHost(a->params());
    auto hf = EellmToHf(c, host);
    ASSERT_TRUE(hf.ok()) << hf.status();
    // HF names only (and eellm.exits.* for the exits).
    for (const auto& [name, t] : *hf) {
      const bool ok =
          absl::StartsWith(name, c.style == ModelStyle::kLlama ? "model." : "transformer.") ||
          name == "lm_head.weight" || absl::StartsWith(name, "eellm.exits.");
      EXPECT_TRUE(ok) << name;
    }
    EXPECT_EQ(hf->count("lm_head.weight"), c.tie_embeddings ? 0u : 1u);
    auto back = HfToEellm(c, *hf);
    ASSERT_TRUE(back.ok()) << back.status();
    auto b = ModelFrom(c, *back, be.get());
    ExpectSameTensors(host, ParamsToHost(b->params()));
  }
}

TEST(HfConvertTest, ConfigRoundTrip) {
  std::vector<ModelConfig> configs = AllConfigs();
  ModelConfig odd = LlamaConfig();
  odd.norm_eps = 1e-6f;
  odd.rope_theta = 1e6f;
  odd.max_seq_len = 4096;
  odd.confidence_weighted_exit_loss = true;
  configs.push_back(odd);
  ModelConfig linear = LlamaConfig();
  linear.rope_scaling = {RopeScalingKind::kLinear, 2.5f};
  configs.push_back(linear);
  for (const ModelConfig& c : configs) {
    const json hf = HfConfigFromModel(c);
    auto back = ModelConfigFromHf(hf);
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << hf.dump(2);
    EXPECT_EQ(back->ToJson(), c.ToJson());
    const RopeScaling &a = back->rope_scaling, &b = c.rope_scaling;  // (ToJson drops nothing)
    EXPECT_EQ(a.kind, b.kind);
    EXPECT_EQ(a.factor, b.factor);
    EXPECT_EQ(a.low_freq_factor, b.low_freq_factor);
    EXPECT_EQ(a.high_freq_factor, b.high_freq_factor);
    EXPECT_EQ(a.original_max_positions, b.original_max_positions);
    EXPECT_EQ(hf.contains("eellm_exits"), !c.exits.empty());
  }
  const json l = HfConfigFromModel(LlamaConfig());
  EXPECT_EQ(l["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(l["model_type"], "llama");
  EXPECT_EQ(l["torch_dtype"], "float32");
  EXPECT_EQ(l["num_key_value_heads"], 2);
  EXPECT_EQ(l["intermediate_size"], 24);
  EXPECT_EQ(l["head_dim"], 4);
  EXPECT_EQ(HfConfigFromModel(WideHeadConfig())["head_dim"], 8);
  EXPECT_EQ(LlamaConfig().ToJson().find("head_dim"), std::string::npos);  // derived: not named
  const json q3 = HfConfigFromModel(Qwen3Config());
  EXPECT_EQ(q3["architectures"], json::array({"Qwen3ForCausalLM"}));
  EXPECT_EQ(q3["model_type"], "qwen3");
  EXPECT_EQ(q3["attention_bias"], false);
  EXPECT_EQ(q3["head_dim"], 8);
  EXPECT_EQ(LlamaConfig().ToJson().find("qk_norm"), std::string::npos);
  // No Hugging Face architecture has both q and k norms and q, k, v biases.
  ModelConfig both = Qwen3Config();
  both.qkv_bias = true;
  auto be = Cpu();
  auto hf_both = EellmToHf(both, ParamsToHost(RandomModel(both, be.get(), 3)->params()));
  ASSERT_FALSE(hf_both.ok());
  EXPECT_NE(hf_both.status().message().find("qk_norm with qkv_bias"), std::string::npos);
  EXPECT_EQ(l["rms_norm_eps"].get<double>(), 1e-5);  // shortest decimal, not 9.99999974e-06
  EXPECT_EQ(l["rope_theta"].get<double>(), 500.0);
  EXPECT_EQ(l["tie_word_embeddings"], false);
  ASSERT_EQ(l["eellm_exits"].size(), 4u);
  EXPECT_EQ(l["eellm_exits"][1]["temperature"].get<double>(), 0.7);
  EXPECT_EQ(l["eellm_exits"][3]["kind"], "block");
  // The canonical JSON names qkv_bias only when set, so older checkpoints' configs still match.
  EXPECT_EQ(LlamaConfig().ToJson().find("qkv_bias"), std::string::npos);
  EXPECT_NE(Qwen2Config().ToJson().find("\"qkv_bias\": true"), std::string::npos);
  const json q = HfConfigFromModel(Qwen2Config());
  EXPECT_EQ(q["architectures"], json::array({"Qwen2ForCausalLM"}));
  EXPECT_EQ(q["model_type"], "qwen2");
  EXPECT_EQ(q["use_sliding_window"], false);
  EXPECT_TRUE(q["sliding_window"].is_null());
  EXPECT_EQ(q["max_window_layers"], 4);
  EXPECT_FALSE(q.contains("attention_bias"));  // LlamaConfig's: it would bias o_proj too
  // RoPE scaling as transformers names it; the canonical JSON names it only when set.
  EXPECT_TRUE(l["rope_scaling"].is_null());
  EXPECT_EQ(LlamaConfig().ToJson().find("rope_scaling"), std::string::npos);
  EXPECT_EQ(HfConfigFromModel(Llama3Config())["rope_scaling"],
            json::parse(R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.5,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})"));
  EXPECT_EQ(HfConfigFromModel(linear)["rope_scaling"],
            json::parse(R"({"rope_type": "linear", "factor": 2.5})"));
  const json g = HfConfigFromModel(GptConfig());
  EXPECT_EQ(g["architectures"], json::array({"GPT2LMHeadModel"}));
  EXPECT_EQ(g["n_embd"], 12);
  EXPECT_EQ(g["n_inner"], 20);
  EXPECT_EQ(g["n_positions"], 16);
  EXPECT_EQ(g["activation_function"], "gelu_new");
  EXPECT_EQ(g["tie_word_embeddings"], true);
}

TEST(HfConvertTest, ConfigErrorsNameTheKeyAndValue) {
  const json llama = HfConfigFromModel(LlamaConfig(false));
  const json gpt2 = HfConfigFromModel(GptConfig(false));
  struct Case {
    json base;
    std::string key;
    json value;  // null with erase = true: remove the key
    bool erase;
    std::vector<std::string> expect;  // substrings of the message
  };
  const std::vector<Case> cases = {
      {llama,
       "rope_scaling",
       json::parse(R"({"type": "dynamic", "factor": 2.0})"),
       false,
       {"rope_scaling", "dynamic"}},
      {llama,
       "rope_parameters",
       json::parse(R"({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})"),
       false,
       {"rope_parameters", "yarn"}},
      {llama,
       "rope_scaling",
       json::parse(R"({"rope_type": "llama3", "factor": 8.0})"),
       false,
       {"rope_scaling", "needs low_freq_factor"}},
      {llama,
       "rope_scaling",
       json::parse(R"({"rope_type": "linear", "factor": "2"})"),
       false,
       {"rope_scaling", "factor must be a number"}},
      {llama, "partial_rotary_factor", 0.5, false, {"partial_rotary_factor 0.5"}},
      {llama,
       "rope_parameters",
       json::parse(R"({"rope_type": "default", "partial_rotary_factor": 0.25})"),
       false,
       {"partial_rotary_factor 0.25"}},
      {llama,
       "rope_scaling",
       json::parse(R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})"),
       false,
       {"low_freq_factor < high_freq_factor", "4 and 1"}},
      {llama, "attention_bias", true, false, {"attention_bias", "true"}},
      {llama, "mlp_bias", true, false, {"mlp_bias", "true"}},
      {llama, "head_dim", -2, false, {"head_dim", "-2"}},
      {llama, "hidden_act", "gelu", false, {"hidden_act", "gelu"}},
      {llama, "model_type", "qwen3_moe", false, {"model_type", "qwen3_moe"}},
      {llama, "architectures", json::array({"MistralForCausalLM"}), false, {"MistralForCausalLM"}},
      {llama, "architectures", json::array({"LlamaModel"}), false, {"architectures", "LlamaModel"}},
      {llama, "hidden_size", nullptr, true, {"hidden_size", "missing"}},
      {llama, "intermediate_size", nullptr, true, {"intermediate_size", "missing"}},
      {llama, "vocab_size", "many", false, {"vocab_size", "many"}},
      {llama, "num_key_value_heads", 3, false, {"num_kv_heads 3"}},
      {llama, "eellm_exits", json::parse(R"([{"layer": 9}])"), false, {"exits[0].layer 9"}},
      {gpt2, "activation_function", "relu", false, {"activation_function", "relu"}},
      {gpt2, "scale_attn_by_inverse_layer_idx", true, false, {"scale_attn_by_inverse_layer_idx"}},
      {gpt2, "n_head", nullptr, true, {"n_head", "missing"}},
      {gpt2, "n_layer", 2.5, false, {"n_layer", "2.5"}},
      {gpt2, "model_type", nullptr, true, {"model_type"}},
  };
  for (const Case& k : cases) {
    json j = k.base;
    if (k.erase) {
      j.erase(k.key);
    } else {
      j[k.key] = k.value;
    }
    auto c = ModelConfigFromHf(j);
    ASSERT_FALSE(c.ok()) << k.key << " = " << k.value.dump();
    for (const std::string& s : k.expect) {
      EXPECT_NE(c.status().message().find(s), std::string::npos)
          << "'" << s << "' not in: " << c.status().message();
    }
  }
  EXPECT_FALSE(ModelConfigFromHf(json::array()).ok());
}

// GPT-2 keeps Conv1D weights as [in, out] and fuses q, k, v along the output: checked on
// known values, in both directions.
TEST(HfConvertTest, Gpt2Conv1DIsTransposedAndCAttnSplit) {
  const ModelConfig c = GptConfig(false);
  const int h = c.hidden_size, f = c.ffn_hidden_size;
  auto be = Cpu();
  auto m = RandomModel(c, be.get(), 3);
  auto hf = EellmToHf(c, ParamsToHost(m->params()));
  ASSERT_TRUE(hf.ok()) << hf.status();
  HostTensor& attn_w = (*hf)["transformer.h.1.attn.c_attn.weight"];
  HostTensor& attn_b = (*hf)["transformer.h.1.attn.c_attn.bias"];
  HostTensor& proj_w = (*hf)["transformer.h.1.attn.c_proj.weight"];
  HostTensor& fc_w = (*hf)["transformer.h.1.mlp.c_fc.weight"];
  HostTensor& down_w = (*hf)["transformer.h.1.mlp.c_proj.weight"];
  ASSERT_EQ(attn_w.shape, (Shape{h, 3 * h}));
  ASSERT_EQ(attn_b.shape, (Shape{3 * h}));
  ASSERT_EQ(fc_w.shape, (Shape{h, f}));
  ASSERT_EQ(down_w.shape, (Shape{f, h}));
  // Eellm -> HF: hf_fc[i][j] = fc1[j][i].
  const HostTensorMap host = ParamsToHost(m->params());
  const auto& fc1 = host.at("layers.1.mlp.fc1.weight").data;
  for (int i = 0; i < h; ++i) {
    for (int j = 0; j < f; ++j) EXPECT_EQ(fc_w.data[i * f + j], fc1[j * h + i]);
  }
  const auto& wk = host.at("layers.1.attn.wk.weight").data;
  for (int i = 0; i < h; ++i) {
    for (int o = 0; o < h; ++o) EXPECT_EQ(attn_w.data[i * 3 * h + h + o], wk[o * h + i]);
  }
  // HF -> eellm with known values: c_attn[i][j] = 1000 i + j, bias[j] = -j.
  for (int i = 0; i < h; ++i) {
    for (int j = 0; j < 3 * h; ++j) attn_w.data[i * 3 * h + j] = 1000.0f * i + j;
  }
  for (int j = 0; j < 3 * h; ++j) attn_b.data[j] = -static_cast<float>(j);
  for (int i = 0; i < h; ++i) {
    for (int o = 0; o < h; ++o) proj_w.data[i * h + o] = 100.0f * i + o;
  }
  for (int i = 0; i < f; ++i) {
    for (int o = 0; o < h; ++o) down_w.data[i * h + o] = 100.0f * i + o;
  }
  auto e = HfToEellm(c, *hf);
  ASSERT_TRUE(e.ok()) << e.status();
  const char* qkv[] = {"layers.1.attn.wq", "layers.1.attn.wk", "layers.1.attn.wv"};
  for (int part = 0; part < 3; ++part) {
    const HostTensor& w = e->at(std::string(qkv[part]) + ".weight");
    const HostTensor& b = e->at(std::string(qkv[part]) + ".bias");
    ASSERT_EQ(w.shape, (Shape{h, h}));
    for (int o = 0; o < h; ++o) {
      for (int i = 0; i < h; ++i) {
        EXPECT_EQ(w.data[o * h + i], 1000.0f * i + part * h + o)
            << qkv[part] << " " << o << " " << i;
      }
      EXPECT_EQ(b.data[o], -static_cast<float>(part * h + o));
    }
  }
  const HostTensor& wo = e->at("layers.1.attn.wo.weight");
  const HostTensor& fc2 = e->at("layers.1.mlp.fc2.weight");
  ASSERT_EQ(fc2.shape, (Shape{h, f}));
  for (int o = 0; o < h; ++o) {
    for (int i = 0; i < h; ++i) EXPECT_EQ(wo.data[o * h + i], 100.0f * i + o);
    for (int i = 0; i < f; ++i) EXPECT_EQ(fc2.data[o * f + i], 100.0f * i + o);
  }
}

// ---- a reference forward pass over HF tensors, written from the transformers models ----------

using Rows = std::vector<std::vector<double>>;

// Linear ([out, in], y = x W^T + b) or Conv1D ([in, out], y = x W + b).
Rows Dense(const Rows& x, const HostTensor& w, const HostTensor* b, bool conv1d) {
  const int64_t in = conv1d ? w.shape[0] : w.shape[1], out = conv1d ? w.shape[1] : w.shape[0];
  Rows y(x.size(), std::vector<double>(out, 0.0));
  for (size_t r = 0; r < x.size(); ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b ? b->data[o] : 0.0;
      for (int64_t i = 0; i < in; ++i)
        s += x[r][i] * (conv1d ? w.data[i * out + o] : w.data[o * in + i]);
      y[r][o] = s;
    }
  }
  return y;
}

Rows Norm(const Rows& x, const HostTensor& g, const HostTensor* b, double eps) {
  Rows y = x;
  for (auto& row : y) {
    const double n = static_cast<double>(row.size());
    double mean = 0, var = 0;
    if (b) {
      for (double v : row) mean += v / n;
    }
    for (double v : row) var += (v - mean) * (v - mean) / n;  // RMSNorm: mean 0
    const double rs = 1.0 / std::sqrt(var + eps);
    for (size_t i = 0; i < row.size(); ++i)
      row[i] = (row[i] - mean) * rs * g.data[i] + (b ? b->data[i] : 0.0);
  }
  return y;
}

// Qwen3's q_norm / k_norm: RMSNorm over each head of size d (the view [t, heads, d]).
Rows HeadNorm(const Rows& x, int d, const HostTensor& g, double eps) {
  Rows y;
  for (const auto& row : x) {
    Rows heads;
    for (size_t h = 0; h * d < row.size(); ++h) {
      heads.emplace_back(row.begin() + h * d, row.begin() + (h + 1) * d);
    }
    y.emplace_back();
    for (const auto& v : Norm(heads, g, nullptr, eps))
      y.back().insert(y.back().end(), v.begin(), v.end());
  }
  return y;
}

// transformers' rotary inv_freq for a head of size d: default, "linear" (divided by the factor)
// or "llama3" (_compute_llama3_parameters, written as it is there: masks over the wavelengths).
std::vector<double> InvFreq(const json& cfg, int d) {
  std::vector<double> inv(d / 2);
  for (int j = 0; j < d / 2; ++j)
    inv[j] = 1.0 / std::pow(cfg["rope_theta"].get<double>(), 2.0 * j / d);
  const json& rs = cfg["rope_scaling"];
  if (rs.is_null()) return inv;
  const double factor = rs["factor"].get<double>();
  if (rs["rope_type"] == "linear") {
    for (double& f : inv) f /= factor;
    return inv;
  }
  EXPECT_EQ(rs["rope_type"], "llama3");
  const double low = rs["low_freq_factor"].get<double>(),
               high = rs["high_freq_factor"].get<double>();
  const double old_context = rs["original_max_position_embeddings"].get<double>();
  const double low_freq_wavelen = old_context / low, high_freq_wavelen = old_context / high;
  for (double& f : inv) {
    const double wavelen = 2 * M_PI / f;
    const double llama = wavelen > low_freq_wavelen ? f / factor : f;
    const double smooth = (old_context / wavelen - low) / (high - low);
    const double smoothed = (1 - smooth) * llama / factor + smooth * llama;
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    f = medium ? smoothed : llama;
  }
  return inv;
}

// transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, per head of size d.
void Rope(Rows& x, int heads, int d, const json& cfg) {
  const std::vector<double> inv_freq = InvFreq(cfg, d);
  for (size_t p = 0; p < x.size(); ++p) {
    for (int h = 0; h < heads; ++h) {
      double* v = x[p].data() + h * d;
      std::vector<double> out(d);
      for (int i = 0; i < d; ++i) {
        const int j = i % (d / 2);
        const double angle = static_cast<double>(p) * inv_freq[j];
        const double rotated = i < d / 2 ? -v[i + d / 2] : v[i - d / 2];
        out[i] = v[i] * std::cos(angle) + rotated * std::sin(angle);
      }
      std::copy(out.begin(), out.end(), v);
    }
  }
}

// Causal attention; query head h uses KV head h / (hq / hkv) (repeat_kv).
Rows Attention(const Rows& q, const Rows& k, const Rows& v, int hq, int hkv, int d) {
  const size_t t = q.size();
  Rows out(t, std::vector<double>(hq * d, 0.0));
  for (int h = 0; h < hq; ++h) {
    const int kh = h / (hq / hkv);
    for (size_t i = 0; i < t; ++i) {
      std::vector<double> s(i + 1);
      double mx = -1e300, sum = 0;
      for (size_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int e = 0; e < d; ++e) dot += q[i][h * d + e] * k[j][kh * d + e];
        s[j] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, s[j]);
      }
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (size_t j = 0; j <= i; ++j) {
        for (int e = 0; e < d; ++e) out[i][h * d + e] += s[j] / sum * v[j][kh * d + e];
      }
    }
  }
  return out;
}

void AddTo(Rows& x, const Rows& y) {
  for (size_t r = 0; r < x.size(); ++r) {
    for (size_t i = 0; i < x[r].size(); ++i) x[r][i] += y[r][i];
  }
}

// Logits [t][vocab] of a LlamaForCausalLM or GPT2LMHeadModel given its config.json and tensors.
Rows ReferenceLogits(const json& cfg, const HostTensorMap& w, const std::vector<int32_t>& ids) {
  auto W = [&](const std::string& n) -> const HostTensor& { return w.at(n); };
  const bool llama = cfg["model_type"] != "gpt2";  // llama, mistral
  const int layers = llama ? cfg["num_hidden_layers"].get<int>() : cfg["n_layer"].get<int>();
  const int hidden = llama ? cfg["hidden_size"].get<int>() : cfg["n_embd"].get<int>();
  const int hq = llama ? cfg["num_attention_heads"].get<int>() : cfg["n_head"].get<int>();
  const int hkv = llama ? cfg["num_key_value_heads"].get<int>() : hq;
  const int d = llama && cfg.contains("head_dim") ? cfg["head_dim"].get<int>() : hidden / hq;
  const double eps =
      llama ? cfg["rms_norm_eps"].get<double>() : cfg["layer_norm_epsilon"].get<double>();
  const std::string emb = llama ? "model.embed_tokens.weight" : "transformer.wte.weight";
  Rows x(ids.size(), std::vector<double>(hidden));
  for (size_t p = 0; p < ids.size(); ++p) {
    for (int i = 0; i < hidden; ++i) {
      x[p][i] = W(emb).data[ids[p] * hidden + i] +
                (llama ? 0.0 : W("transformer.wpe.weight").data[p * hidden + i]);
    }
  }
  for (int l = 0; l < layers; ++l) {
    if (llama) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Rows a = Norm(x, W(p + "input_layernorm.weight"), nullptr, eps);
      auto bias = [&](const std::string& n) { return w.count(n) ? &W(n) : nullptr; };  // Qwen2
      Rows q = Dense(a, W(p + "self_attn.q_proj.weight"), bias(p + "self_attn.q_proj.bias"), false);
      Rows k = Dense(a, W(p + "self_attn.k_proj.weight"), bias(p + "self_attn.k_proj.bias"), false);
      Rows v = Dense(a, W(p + "self_attn.v_proj.weight"), bias(p + "self_attn.v_proj.bias"), false);
      if (w.count(p + "self_attn.q_norm.weight")) {  // Qwen3: RMSNorm of every head
        q = HeadNorm(q, d, W(p + "self_attn.q_norm.weight"), eps);
        k = HeadNorm(k, d, W(p + "self_attn.k_norm.weight"), eps);
      }
      Rope(q, hq, d, cfg);
      Rope(k, hkv, d, cfg);
      AddTo(x, Dense(Attention(q, k, v, hq, hkv, d), W(p + "self_attn.o_proj.weight"), nullptr,
                     false));
      Rows m = Norm(x, W(p + "post_attention_layernorm.weight"), nullptr, eps);
      Rows g = Dense(m, W(p + "mlp.gate_proj.weight"), nullptr, false);
      Rows u = Dense(m, W(p + "mlp.up_proj.weight"), nullptr, false);
      for (size_t r = 0; r < g.size(); ++r) {
        for (size_t i = 0; i < g[r].size(); ++i)
          g[r][i] = g[r][i] / (1 + std::exp(-g[r][i])) * u[r][i];
      }
      AddTo(x, Dense(g, W(p + "mlp.down_proj.weight"), nullptr, false));
    } else {
      const std::string p = "transformer.h." + std::to_string(l) + ".";
      Rows a = Norm(x, W(p + "ln_1.weight"), &W(p + "ln_1.bias"), eps);
      Rows qkv = Dense(a, W(p + "attn.c_attn.weight"), &W(p + "attn.c_attn.bias"), true);
      Rows q(x.size()), k(x.size()), v(x.size());
      for (size_t r = 0; r < x.size(); ++r) {
        q[r].assign(qkv[r].begin(), qkv[r].begin() + hidden);
        k[r].assign(qkv[r].begin() + hidden, qkv[r].begin() + 2 * hidden);
        v[r].assign(qkv[r].begin() + 2 * hidden, qkv[r].end());
      }
      AddTo(x, Dense(Attention(q, k, v, hq, hq, d), W(p + "attn.c_proj.weight"),
                     &W(p + "attn.c_proj.bias"), true));
      Rows m = Norm(x, W(p + "ln_2.weight"), &W(p + "ln_2.bias"), eps);
      Rows f = Dense(m, W(p + "mlp.c_fc.weight"), &W(p + "mlp.c_fc.bias"), true);
      for (auto& row : f) {
        for (double& z : row) {
          z = 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
        }
      }
      AddTo(x, Dense(f, W(p + "mlp.c_proj.weight"), &W(p + "mlp.c_proj.bias"), true));
    }
  }
  x = llama ? Norm(x, W("model.norm.weight"), nullptr, eps)
            : Norm(x, W("transformer.ln_f.weight"), &W("transformer.ln_f.bias"), eps);
  const bool tied = cfg["tie_word_embeddings"].get<bool>();
  return Dense(x, W(tied ? emb : "lm_head.weight"), nullptr, false);
}

// A model converted to HF computes, by the HF definition of its architecture, the logits the
// eellm model computes; a model built back from the HF tensors gives them too.
TEST(HfConvertTest, LogitsMatchHfReferenceForward) {
  auto be = Cpu();
  ModelConfig untied_gpt = GptConfig(true, false);
  ModelConfig tied_llama = LlamaConfig();
  tied_llama.tie_embeddings = true;
  for (const ModelConfig& c : {LlamaConfig(), tied_llama, Qwen2Config(), Llama3Config(),
                               WideHeadConfig(), Qwen3Config(), GptConfig(), untied_gpt}) {
    SCOPED_TRACE(c.ToJson());
    auto a = RandomModel(c, be.get(), 17);
    const std::vector<int32_t> ids = testing::RandomTokens(9, c.vocab_size, 4);
    auto logits = HeadLogits(*a, ids, -1);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const json cfg = HfConfigFromModel(c);
    auto hf = EellmToHf(c, ParamsToHost(a->params()));
    ASSERT_TRUE(hf.ok());
    const Rows ref = ReferenceLogits(cfg, *hf, ids);
    double max_ref = 0, max_err = 0;
    for (size_t p = 0; p < ids.size(); ++p) {
      for (int v = 0; v < c.vocab_size; ++v) {
        max_ref = std::max(max_ref, std::fabs(ref[p][v]));
        max_err = std::max(max_err, std::fabs(ref[p][v] - (*logits)[p * c.vocab_size + v]));
      }
    }
    EXPECT_GT(max_ref, 0.1);
    EXPECT_LT(max_err / max_ref, 1e-5);
    auto c2 = ModelConfigFromHf(cfg);
    ASSERT_TRUE(c2.ok());
    if (c.style == ModelStyle::kLlama && !c.qkv_bias && !c.qk_norm) {  // as Mistral, windowed
      json m = cfg;
      m["model_type"] = "mistral";
      m["architectures"] = json::array({"MistralForCausalLM"});
      m["sliding_window"] = static_cast<int>(ids.size());
      EXPECT_LT(ids.size(), cfg["max_position_embeddings"].get<size_t>());
      auto cm = ModelConfigFromHf(m);
      ASSERT_TRUE(cm.ok()) << cm.status();
      EXPECT_EQ(cm->max_seq_len, static_cast<int>(ids.size()));
      auto em = HfToEellm(*cm, *hf);
      ASSERT_TRUE(em.ok()) << em.status();
      EXPECT_EQ(*HeadLogits(*ModelFrom(*cm, *em, be.get()), ids, -1), *logits);
    }
    auto e = HfToEellm(*c2, *std::move(hf));
    ASSERT_TRUE(e.ok()) << e.status();
    auto b = ModelFrom(*c2, *e, be.get());
    EXPECT_EQ(*HeadLogits(*b, ids, -1), *logits);
    for (int i = 0; i < static_cast<int>(c.exits.size()); ++i) {
      EXPECT_EQ(*HeadLogits(*b, ids, i), *HeadLogits(*a, ids, i)) << "exit " << i;
    }
  }
}

bool Contains(const absl::Status& s, const std::string& part) {
  return s.message().find(part) != absl::string_view::npos;
}

TEST(HfConvertTest, TensorErrorsNameTheTensor) {
  auto be = Cpu();
  const ModelConfig c = LlamaConfig();
  auto m = RandomModel(c, be.get(), 9);
  const HostTensorMap host = ParamsToHost(m->params());
  const HostTensorMap hf = *EellmToHf(c, host);

  HostTensorMap missing = hf;
  missing.erase("model.layers.2.mlp.up_proj.weight");
  absl::Status s = HfToEellm(c, missing).status();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s, "model.layers.2.mlp.up_proj.weight")) << s;
  EXPECT_TRUE(Contains(s, "missing")) << s;

  HostTensorMap no_exit = hf;
  no_exit.erase("eellm.exits.3.block.attn.wk.weight");
  s = HfToEellm(c, no_exit).status();
  EXPECT_TRUE(Contains(s, "eellm.exits.3.block.attn.wk.weight")) << s;

  HostTensorMap wrong = hf;
  wrong["model.layers.1.self_attn.k_proj.weight"].shape = {16, 8};  // [kv * d, hidden] is [8, 16]
  s = HfToEellm(c, wrong).status();
  EXPECT_TRUE(Contains(s, "model.layers.1.self_attn.k_proj.weight")) << s;
  EXPECT_TRUE(Contains(s, "[16, 8]")) << s;
  EXPECT_TRUE(Contains(s, "[8, 16]")) << s;

  HostTensorMap extra = hf;
  extra["model.layers.7.self_attn.q_proj.weight"] = {{1}, {0.0f}};
  s = HfToEellm(c, extra).status();
  EXPECT_TRUE(Contains(s, "unexpected")) << s;
  EXPECT_TRUE(Contains(s, "model.layers.7.self_attn.q_proj.weight")) << s;

  HostTensorMap short_data = hf;
  short_data["model.norm.weight"].data.pop_back();
  s = HfToEellm(c, short_data).status();
  EXPECT_TRUE(Contains(s, "model.norm.weight")) << s;

  // Buffers transformers files may hold are ignored: Llama's inv_freq, GPT-2's masks.
  HostTensorMap buffers = hf;
  buffers["model.layers.0.self_attn.rotary_emb.inv_freq"] = {{2}, {1.0f, 0.1f}};
  EXPECT_TRUE(HfToEellm(c, buffers).ok());

  // eellm -> HF checks its input the same way.
  HostTensorMap e_missing = host;
  e_missing.erase("layers.0.attn.wq.weight");
  s = EellmToHf(c, e_missing).status();
  EXPECT_TRUE(Contains(s, "layers.0.attn.wq.weight")) << s;
  HostTensorMap e_extra = host;
  e_extra["exits.9.head.weight"] = {{1}, {0.0f}};
  s = EellmToHf(c, e_extra).status();
  EXPECT_TRUE(Contains(s, "exits.9.head.weight")) << s;
  HostTensorMap e_shape = host;
  e_shape["output.weight"].shape = {16, 23};
  s = EellmToHf(c, e_shape).status();
  EXPECT_TRUE(Contains(s, "output.weight")) << s;
}

// GPT-2 files: with or without "transformer.", attention mask buffers and a tied lm_head copy.
TEST(HfConvertTest, Gpt2AcceptsBareNamesBuffersAndTiedHead) {
  auto be = Cpu();
  const ModelConfig c = GptConfig();
  auto m = RandomModel(c, be.get(), 13);
  const HostTensorMap host = ParamsToHost(m->params());
  const HostTensorMap hf = *EellmToHf(c, host);
  HostTensorMap bare;
  for (const auto& [name, t] : hf) {
    bare[absl::StartsWith(name, "transformer.") ? name.substr(12) : name] = t;
  }
  for (int l = 0; l < c.num_layers; ++l) {
    bare["h." + std::to_string(l) + ".attn.bias"] = {{1, 1, 4, 4}, std::vector<float>(16, 1.0f)};
    bare["h." + std::to_string(l) + ".attn.masked_bias"] = {{}, {-1e4f}};
  }
  bare["lm_head.weight"] = hf.at("transformer.wte.weight");
  auto e = HfToEellm(c, bare);
  ASSERT_TRUE(e.ok()) << e.status();
  ExpectSameTensors(*e, host);

  HostTensorMap both = hf;
  both["wte.weight"] = hf.at("transformer.wte.weight");
  absl::Status s = HfToEellm(c, both).status();
  EXPECT_TRUE(Contains(s, "wte.weight")) << s;
  // A mask buffer of a layer the model does not have is unexpected.
  HostTensorMap deep = hf;
  deep["transformer.h.5.attn.bias"] = {{1}, {1.0f}};
  s = HfToEellm(c, deep).status();
  EXPECT_TRUE(Contains(s, "transformer.h.5.attn.bias")) << s;
  // An untied GPT-2 needs its lm_head.
  const ModelConfig untied = GptConfig(true, false);
  HostTensorMap hf_untied =
      *EellmToHf(untied, ParamsToHost(RandomModel(untied, be.get(), 1)->params()));
  hf_untied.erase("lm_head.weight");
  s = HfToEellm(untied, hf_untied).status();
  EXPECT_TRUE(Contains(s, "lm_head.weight")) << s;
}

}  // namespace
}  // namespace eellm
