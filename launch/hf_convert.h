// Hugging Face <-> eellm model conversion in memory (no file I/O): the model config
// (config.json of LlamaForCausalLM or GPT2LMHeadModel <-> ModelConfig; MistralForCausalLM reads
// as Llama with the context cut to its sliding window, Qwen2ForCausalLM as Llama with qkv_bias,
// Qwen3ForCausalLM as Llama with qk_norm and head_dim, both written back as such) and the tensors
// (HF names and layouts <-> eellm parameter names, see models/transformer.cc and
// models/layers.cc; Qwen2 adds self_attn.{q,k,v}_proj.bias, Qwen3 self_attn.{q,k}_norm.weight
// -> attn.{q,k}_norm.weight).
//
// Naming, per layer i (eellm "layers.{i}." on the right):
//   Llama  model.embed_tokens.weight                 embedding.word.weight
//          model.layers.{i}.input_layernorm.weight   attn_norm.weight
//          model.layers.{i}.self_attn.{q,k,v,o}_proj attn.{wq,wk,wv,wo}  (.weight, [out, in])
//          model.layers.{i}.post_attention_layernorm mlp_norm
//          model.layers.{i}.mlp.{gate,up,down}_proj  mlp.{fc1,up,fc2}
//          model.norm.weight, lm_head.weight         final_norm.weight, output.weight (untied)
//   GPT-2  transformer.wte / wpe                     embedding.word / embedding.position
//          transformer.h.{i}.ln_1 / ln_2             attn_norm / mlp_norm (.weight, .bias)
//          transformer.h.{i}.attn.c_attn             attn.wq, wk, wv fused along the output
//          transformer.h.{i}.attn.c_proj             attn.wo
//          transformer.h.{i}.mlp.c_fc / c_proj       mlp.fc1 / mlp.fc2
//          transformer.ln_f                          final_norm
//   GPT-2 uses Conv1D, whose weights are [in, out]: they are transposed. Inputs may omit the
//   "transformer." prefix (GPT2Model files); outputs always have it. RoPE needs no permutation
//   (eellm uses the rotate_half convention of HF Llama).
// Exit heads have no HF counterpart: they travel under their eellm names prefixed by "eellm."
// ("eellm.exits.0.head.weight"), which transformers loads with an "unused weights" warning, and
// config.json carries the exits under "eellm_exits", so eellm -> HF -> eellm is bit-exact.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoints/host_tensor.h"
#include "models/model_config.h"
#include "nlohmann/json.hpp"

namespace eellm {

// Prefix of eellm-only tensors (exits) in an HF tensor map.
inline constexpr char kHfEellmTensorPrefix[] = "eellm.";
// config.json key holding the exits (a JSON array in the ModelConfig "exits" format).
inline constexpr char kHfExitsKey[] = "eellm_exits";
// config.json key holding ModelConfig::confidence_weighted_exit_loss (written when true).
inline constexpr char kHfConfidenceWeightedKey[] = "eellm_confidence_weighted_exit_loss";

// ModelConfig from a Hugging Face config.json (parsed). Supported: model_type "llama"
// (LlamaForCausalLM; "mistral", "qwen2" (qkv_bias) and "qwen3" (qk_norm; head_dim default 128)
// read as Llama) and "gpt2" (GPT2LMHeadModel).
//   llama: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size,
//          max_position_embeddings are required; num_key_value_heads (= heads), rms_norm_eps
//          (1e-6), rope_theta (10000, or rope_parameters.rope_theta), rope_scaling or
//          rope_parameters (the default RoPE, or "linear" or "llama3" scaling), tie_word_embeddings
//          (false). Rejected: other RoPE scalings, rope_scaling and rope_parameters scaling
//          differently, partial_rotary_factor other than 1, attention_bias or mlp_bias true,
//          hidden_act other than silu. head_dim (hidden_size / heads) may differ.
//   gpt2:  n_embd, n_layer, n_head, n_positions, vocab_size are required; n_inner (null: 4 *
//          n_embd), layer_norm_epsilon (1e-5), tie_word_embeddings (true), activation_function
//          ("gelu_new"; gelu_new or gelu_pytorch_tanh, both the tanh approximation). Rejected:
//          scale_attn_weights false, scale_attn_by_inverse_layer_idx true, add_cross_attention.
// Keys not named here (token ids, dropout, dtype, ...) are ignored. Errors name the key and its
// value. The exits come from "eellm_exits" when present.
absl::StatusOr<ModelConfig> ModelConfigFromHf(const nlohmann::json& hf_config);

// The inverse: a config.json transformers can load (architectures, model_type, torch_dtype
// "float32", the sizes), plus "eellm_exits" when the model has exits.
nlohmann::json HfConfigFromModel(const ModelConfig& c);

// Names and shapes of every parameter of the whole model for `c` (one pipeline stage, no tensor
// parallelism), in the order Model declares them. Uses the layer declarations of
// models/layers.h, so the names cannot drift from the model's; allocates nothing.
std::vector<std::pair<std::string, Shape>> EellmParamShapes(const ModelConfig& c);

// HF tensors -> eellm tensors of the whole model for `c`. Every expected HF tensor must be
// present with its expected shape (errors name the HF tensor and both shapes); any other tensor
// is an error naming it, except the ones HF files carry besides the parameters: GPT-2's
// h.{i}.attn.bias / h.{i}.attn.masked_bias buffers, Llama's rotary_emb.inv_freq buffers, and
// lm_head.weight when the embeddings are tied. Takes the map by value: pass std::move(map) to
// avoid a copy (renamed tensors are then moved, not copied).
absl::StatusOr<HostTensorMap> HfToEellm(const ModelConfig& c, HostTensorMap hf);

// eellm tensors (exactly the parameters of `c`, see EellmParamShapes) -> HF tensors.
absl::StatusOr<HostTensorMap> EellmToHf(const ModelConfig& c, HostTensorMap eellm);

}  // namespace eellm
