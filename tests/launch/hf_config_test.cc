// Hugging Face config.json files as transformers writes them (Llama 2 and 3.1, transformers 5's
// rope_parameters, Mistral, Qwen2.5, Qwen3, GPT-2), read into eellm model configs.
#include <string>

#include "gtest/gtest.h"
#include "launch/hf_convert.h"

namespace eellm {
namespace {

using nlohmann::json;

// config.json files as transformers writes them.
TEST(HfConvertTest, ReadsTransformersConfigs) {
  const json llama = json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
    "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})");
  auto c = ModelConfigFromHf(llama);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->style, ModelStyle::kLlama);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->ffn_hidden_size, 11008);
  EXPECT_EQ(c->num_layers, 32);
  EXPECT_EQ(c->num_heads, 32);
  EXPECT_EQ(c->num_kv_heads, 32);
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_EQ(c->max_seq_len, 4096);
  EXPECT_EQ(c->norm_eps, 1e-5f);
  EXPECT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->tie_embeddings);
  EXPECT_TRUE(c->exits.empty());

  // transformers 5 style: rope_theta inside rope_parameters; GQA; defaults for missing keys.
  json llama3 = json::parse(R"({"model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})");
  c = ModelConfigFromHf(llama3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->norm_eps, 1e-6f);  // LlamaConfig's default
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kNone);

  // Llama 3.1 8B: RoPE scaled for a 131,072-token context ("llama3").
  json llama31 = json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})");
  c = ModelConfigFromHf(llama31);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_len, 131072);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_positions, 8192);
  EXPECT_EQ(HfConfigFromModel(*c)["rope_scaling"], llama31["rope_scaling"]);
  // transformers 5 keeps it in rope_parameters with the theta; the older "type" also reads.
  json t5 = llama31;
  t5.erase("rope_scaling");
  t5.erase("rope_theta");
  t5["rope_parameters"] = json::parse(R"({"rope_type": "llama3", "rope_theta": 500000.0,
    "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})");
  c = ModelConfigFromHf(t5);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 32.0f);
  json old = llama31;
  old["rope_scaling"] = json::parse(R"({"type": "linear", "factor": 4.0})");
  c = ModelConfigFromHf(old);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 4.0f);
  // Both keys: they must agree.
  json both = t5;
  both["rope_scaling"] = llama31["rope_scaling"];
  both["rope_scaling"]["factor"] = 32.0;
  c = ModelConfigFromHf(both);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.factor, 32.0f);
  both["rope_scaling"]["factor"] = 8.0;
  c = ModelConfigFromHf(both);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("scale RoPE differently"), std::string::npos) << c.status();

  // Mistral 7B v0.1: Llama with GQA and a 4,096-token sliding window, within which attention is
  // Llama's: the context is cut to it. v0.3: no window.
  json mistral = json::parse(R"({
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
    "vocab_size": 32000})");
  c = ModelConfigFromHf(mistral);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->style, ModelStyle::kLlama);
  EXPECT_EQ(c->ffn_hidden_size, 14336);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->max_seq_len, 4096);
  mistral["sliding_window"] = nullptr;
  mistral["rope_theta"] = 1000000.0;
  mistral["vocab_size"] = 32768;
  c = ModelConfigFromHf(mistral);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_len, 32768);
  EXPECT_EQ(c->rope_theta, 1000000.0f);
  mistral["sliding_window"] = 0;
  EXPECT_FALSE(ModelConfigFromHf(mistral).ok());
  mistral.erase("sliding_window");  // transformers' default window, 4096
  c = ModelConfigFromHf(mistral);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_len, 4096);

  // Qwen2.5 0.5B: biases on q, k, v; its sliding window is off (use_sliding_window false).
  json qwen = json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
    "vocab_size": 151936})");
  c = ModelConfigFromHf(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->style, ModelStyle::kLlama);
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_TRUE(c->tie_embeddings);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->head_dim(), 64);
  EXPECT_EQ(c->max_seq_len, 32768);
  EXPECT_EQ(c->norm_eps, 1e-6f);
  qwen["use_sliding_window"] = true;  // but from layer max_window_layers = 24 of 24: none
  qwen["sliding_window"] = 4096;
  c = ModelConfigFromHf(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_len, 32768);
  qwen["max_window_layers"] = 20;
  c = ModelConfigFromHf(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_len, 4096);

  // Qwen3 0.6B: q and k norms per head, heads of 128 over a hidden size of 1,024 (16 heads).
  const json qwen3 = json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
    "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})");
  c = ModelConfigFromHf(qwen3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->qkv_bias);
  EXPECT_EQ(c->head_dim(), 128);
  EXPECT_EQ(c->num_heads, 16);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->max_seq_len, 40960);
  EXPECT_TRUE(c->tie_embeddings);
  EXPECT_EQ(c->rope_theta, 1e6f);

  const json gpt2 = json::parse(R"({
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
    "n_head": 12, "n_inner": null, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
    "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
    "summary_type": "cls_index", "summary_use_proj": true, "vocab_size": 50257})");
  c = ModelConfigFromHf(gpt2);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->style, ModelStyle::kGpt);
  EXPECT_EQ(c->hidden_size, 768);
  EXPECT_EQ(c->ffn_hidden_size, 3072);
  EXPECT_EQ(c->num_layers, 12);
  EXPECT_EQ(c->num_heads, 12);
  EXPECT_EQ(c->vocab_size, 50257);
  EXPECT_EQ(c->max_seq_len, 1024);
  EXPECT_TRUE(c->tie_embeddings);
}

}  // namespace
}  // namespace eellm
