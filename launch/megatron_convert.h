// Megatron-LM / EE-LLM checkpoint -> eellm model (config and whole tensors), read without Python
// through checkpoints/torch_file.h. What is read (EE-LLM's checkpointing.py and model code):
//
// Files: <save>/latest_checkpointed_iteration.txt names the iteration ("release" or a number);
// <save>/iter_0001000/ (or release/) holds mp_rank_TT/ (no pipeline parallelism) or
// mp_rank_TT_PPP/ per tensor-parallel rank TT and pipeline stage PPP, each with
// model_optim_rng.pt. The input may be the save directory, an iteration directory, or one
// model_optim_rng.pt of a tp 1, pp 1 run.
//
// Config, from the saved args (argparse.Namespace): num_layers, hidden_size, ffn_hidden_size,
// num_attention_heads, kv_channels, group_query_attention / num_query_groups, padded_vocab_size,
// max_position_embeddings, normalization, norm_epsilon (layernorm_epsilon), swiglu,
// add_bias_linear, untie_embeddings_and_output_weights, position_embedding_type,
// rotary_percent (must be 1), rotary_seq_len_interpolation_factor (linear RoPE scaling),
// rotary_base (10000 when absent, as Megatron then hard-codes), apply_layernorm_1p (stored
// gains + 1), tensor/pipeline_model_parallel_size. Two combinations map onto eellm's styles:
//   gpt:   LayerNorm, learned absolute positions, GELU, biases
//   llama: RMSNorm, RoPE, SwiGLU, no biases (or q/k/v biases with add_qkv_bias)
// Others (e.g. LayerNorm with RoPE) are refused naming the arguments. Megatron's GELU is the tanh
// approximation eellm uses with openai_gelu or its default fused bias-GELU; otherwise (exact erf
// GELU) the conversion warns: activations then differ by up to about 5e-4.
//
// Exits (EE-LLM): exit_layer_nums (1-based), pre_exit (position pre), use_exit_norm,
// use_exit_mlp (the layer's MLP splits into mlp.trunk and an exit branch mlp.branch, which
// shares the layer's post-attention norm), use_exit_block (a whole layer, exit_block),
// untie_exit_output_weights (else the exit shares the word embeddings), exit_layer_temperature,
// exit_layer_weight (with _init, _warmup_iters, _warmup_style). eellm kinds: linear (nothing),
// norm (exit_norm), mlp (branch + exit_norm), block (exit_block + exit_norm); an MLP or block
// without exit_norm is refused. A pre exit reads the layer's input through exit_block and
// exit_norm only (EE-LLM computes the MLP branch there but does not use it): use_exit_mlp with
// pre_exit gives norm (or linear) exits.
//
// Tensors per tensor-parallel rank are merged: query_key_value rows are group-major ([q heads of
// the group..., k, v] per KV group, groups split over ranks); dense_h_to_4h with SwiGLU is
// [gate; up] per rank; vocabulary rows and column-parallel outputs are concatenated, row-parallel
// inputs concatenated along columns; norms and row-parallel biases come from rank 0. Layer
// numbers are local to a pipeline stage (offset stage * num_layers / pp). Optimizer state and RNG
// states are not read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoints/host_tensor.h"
#include "checkpoints/pickle.h"
#include "models/model_config.h"

namespace eellm {

struct MegatronModel {
  ModelConfig config;
  HostTensorMap tensors;  // eellm names, whole (tp 1, pp 1)
  int64_t iteration = 0;
  int tp = 1, pp = 1;     // the checkpoint's layout
  std::string tokenizer;  // what Megatron used: tokenizer_type and its files
  // Those files as a --tokenizer spec (models/tokenizer.h) when they are on this machine: GPT-2's
  // vocab_file and merge_file, a tokenizer_model ending in .model or .json, or a directory
  // holding a tokenizer.json; else empty.
  std::string tokenizer_spec;
  std::vector<std::string> warnings;  // approximations the caller should print
};

// The eellm config of a Megatron args Namespace (`args` as TorchFile reads it). Errors name the
// argument and its value; `warnings` receives approximations.
absl::StatusOr<ModelConfig> ModelConfigFromMegatronArgs(const PyValue& args,
                                                        std::vector<std::string>* warnings);

// Reads the checkpoint at `path` (see above). `progress` prints one line per file read.
absl::StatusOr<MegatronModel> ReadMegatronCheckpoint(const std::string& path, bool progress);

}  // namespace eellm
