// ModelConfig: the decoder-only transformer and its early-exit heads, parsed from JSON and
// validated (every error names the bad key or value). GPT-2 style: LayerNorm, GELU, learned
// positions, biases, tied embeddings. Llama style: RMSNorm, RoPE, SwiGLU, no biases (or q, k, v
// biases with qkv_bias, as Qwen2), GQA, untied output.
//
// JSON (all keys optional except those marked *):
//   { "style": "gpt"|"llama"*, "vocab_size"*, "hidden_size"*, "num_layers"*, "num_heads"*,
//     "num_kv_heads" (= num_heads), "head_dim" (hidden_size / num_heads; llama may set another,
//     as Qwen3 and Mistral Nemo do: q is num_heads x head_dim wide, the output projection maps
//     it back to hidden_size), "ffn_hidden_size" (4h gpt, 8h/3 rounded to 64 llama),
//     "max_seq_len"*, "norm_eps" (1e-5), "rope_theta" (10000),
//     "rope_scaling" (none; llama only): {"type": "linear", "factor"*} or {"type": "llama3",
//       "factor"*, "low_freq_factor" (1), "high_freq_factor" (4),
//       "original_max_position_embeddings" (8192)} (Hugging Face's names, but "type" for its
//       "rope_type"; engine/core/rope.h),
//     "tie_embeddings" (gpt true,
//     llama false), "qkv_bias" (false; llama only: biases on the q, k, v projections, as
//     Qwen2 has), "qk_norm" (false; llama only: RMSNorm over each head of q and k before RoPE,
//     as Qwen3 has), "confidence_weighted_exit_loss" (false),
//     "exits": [ { "layer"* (1-based), "kind": "linear"|"norm"|"mlp"|"block" ("norm"),
//                  "position": "post"|"pre" ("post"), "tied" (false), "temperature" (1.0),
//                  "loss_weight" (1.0), "loss_weight_init" (= loss_weight),
//                  "loss_weight_warmup_iters" (0), "loss_weight_warmup": "linear"|"cosine" } ] }
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/rope.h"

namespace eellm {

enum class ModelStyle { kGpt, kLlama };
enum class ExitKind { kLinear, kNorm, kMlp, kBlock };
enum class ExitPosition { kPost, kPre };
enum class WarmupStyle { kLinear, kCosine };

const char* ExitKindName(ExitKind k);

struct ExitConfig {
  int layer = 0;  // 1-based. Post: reads the output of `layer`; pre: reads its input.
  ExitKind kind = ExitKind::kNorm;
  ExitPosition position = ExitPosition::kPost;
  bool tied = false;         // output projection shared with the word embedding
  float temperature = 1.0f;  // divides the exit's logits: in its training loss and its confidence
  float loss_weight = 1.0f;
  float loss_weight_init = 1.0f;
  int loss_weight_warmup_iters = 0;
  WarmupStyle loss_weight_warmup = WarmupStyle::kLinear;

  // Depth order: the number of backbone layers computed when this exit reads its input.
  int depth() const { return position == ExitPosition::kPost ? layer : layer - 1; }
};

struct ModelConfig {
  ModelStyle style = ModelStyle::kGpt;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int ffn_hidden_size = 0;
  int max_seq_len = 0;
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;  // kind kNone: plain RoPE
  bool tie_embeddings = true;
  bool qkv_bias = false;  // llama style: biases on the q, k and v projections (Qwen2)
  bool qk_norm = false;   // llama style: RMSNorm of each q and k head before RoPE (Qwen3)
  bool confidence_weighted_exit_loss = false;
  std::vector<ExitConfig> exits;  // sorted by depth (pre before post at equal layer)

  // Derived from the style.
  bool use_rmsnorm() const { return style == ModelStyle::kLlama; }
  bool use_rope() const { return style == ModelStyle::kLlama; }
  bool use_swiglu() const { return style == ModelStyle::kLlama; }
  bool use_bias() const { return style == ModelStyle::kGpt; }
  bool use_qkv_bias() const { return use_bias() || qkv_bias; }
  bool learned_positions() const { return style == ModelStyle::kGpt; }
  RopeParams rope() const { return {rope_theta, rope_scaling}; }
  // A tensor-parallel rank works with a local config: heads, KV heads, FFN size and vocabulary
  // divided by tp_size (see LocalConfig); the head dimension stays that of the whole model.
  int tp_size = 1;
  // When tp exceeds num_kv_heads (tp a multiple of it), each tensor-parallel rank holds one KV
  // head, shared by kv_replicas = tp / num_kv_heads ranks (Megatron's KV-head replication).
  int kv_replicas = 1;
  int explicit_head_dim = 0;  // "head_dim" when set (0: hidden_size / num_heads)
  int head_dim() const {
    return explicit_head_dim > 0 ? explicit_head_dim : hidden_size / (num_heads * tp_size);
  }

  std::string ToJson() const;  // canonical JSON (round-trips through ParseModelConfig)
};

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
// This tensor-parallel rank's share of `c` (tp divides heads, KV heads, FFN size, vocabulary).
ModelConfig LocalConfig(const ModelConfig& c, int tp);
// Whether `c` splits over `tp` tensor-parallel ranks: heads, FFN and vocabulary divisible by tp,
// and KV heads divisible by tp or (replicated) dividing tp.
bool SplitsOverTp(const ModelConfig& c, int tp);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

}  // namespace eellm
