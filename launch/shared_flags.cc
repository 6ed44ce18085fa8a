#include "launch/shared_flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, input, "",
          "data: the text file to tokenize; convert: the source (a Hugging Face directory or "
          ".safetensors file for hf-to-eellm, else an eellm checkpoint)");
ABSL_FLAG(std::string, output, "",
          "data: the token-file prefix (writes <output>.train.bin and .val.bin; default "
          "data/corpus); convert: the destination (a Hugging Face directory for eellm-to-hf, "
          "else an eellm run directory)");
ABSL_FLAG(int, tp, 0,
          "tensor-parallel size (train: 0 = train.tp; convert: the layout the output is split "
          "for, 0 = 1; generate, serve: processes per pipeline stage, 0 = all of them)");
ABSL_FLAG(int, pp, 0,
          "pipeline-parallel size (train: 0 = train.pp; convert: the layout the output is split "
          "for, 0 = 1; generate, serve: pipeline stages under mpirun, each finishing every token "
          "while stage 0 starts the next, 0 = 1)");
ABSL_FLAG(uint64_t, seed, 1234,
          "random seed (generate: sampling; convert add-exits: randomly initialised weights)");
ABSL_FLAG(std::string, checkpoint, "",
          "checkpoint: a run directory of eellm train (its latest step), a step directory or a "
          "checkpoint file (required)");
ABSL_FLAG(std::string, backend, "cpu",
          "compute backend: cpu, cuda (fp32), cuda-bf16 (bf16 tensor-core GEMMs, fused attention) "
          "or cuda-bf16w (also bf16 weight copies), optionally with :<device> (train: overrides "
          "the config's train.backend)");
ABSL_FLAG(int, exit, -1,
          "exit index, 0-based in depth order (logits: -1 = the final head; convert "
          "set-exit-position: the exit to move)");
ABSL_FLAG(int, steps, 0,
          "steps (train: override train.steps, 0 = keep; bench train: timed steps, 0 = 5)");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature (0 = greedy)");
ABSL_FLAG(int, max_model_len, 0,
          "most tokens (prompt + completion) of one sequence, at most the model's max_seq_len; "
          "the KV cache and buffers are sized by it (0: generate, the prompt + "
          "--max_new_tokens; bench generate, its longest prompt + --new_tokens; serve, the "
          "model's max_seq_len)");
ABSL_FLAG(int, draft_tokens, 4,
          "self-speculative decoding: tokens the exit drafts per round before one full-model pass "
          "checks them (1-16)");
ABSL_FLAG(double, draft_confidence, 0.0,
          "self-speculative decoding: a draft whose exit confidence (max probability) is below "
          "this ends the round early, so unlikely drafts are not extended (0 = always draft "
          "--draft_tokens)");
ABSL_FLAG(std::string, tokenizer, "",
          "tokenizer: byte, or the path of a Hugging Face tokenizer.json (byte-level or "
          "SentencePiece-style BPE); data: default byte; convert megatron-to-eellm copies it "
          "beside the checkpoint (required when the Megatron run names a tokenizer)");
