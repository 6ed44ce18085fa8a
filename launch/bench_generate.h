// The generation benchmark behind `eellm bench generate`: decode throughput of batched early-exit
// generation (one forward pass for every sequence) against the same prompts generated one at a
// time, in the same process, at several exit thresholds; with the average layers run, the share
// of tokens that exited early, and whether batching changed any sequence's tokens; then
// self-speculative decoding against the full model, per drafting exit. Under mpirun,
// a pipeline's batched generation against one process's.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "models/pipeline_generator.h"
#include "models/tokenizer.h"
#include "models/transformer.h"

namespace eellm {

struct GenerateBenchOptions {
  int batch = 8;         // sequences
  int new_tokens = 128;  // generated per sequence (no EOS stop)
  std::vector<float> thresholds = {1.0f, 0.8f};
  float temperature = 0;  // 0 = greedy
  uint64_t seed = 1234;
  // Self-speculative decoding: the exits' layers that draft (a row each; none: no such rows),
  // and the drafts a round.
  std::vector<int> draft_exits;
  int draft_tokens = 4;
  float draft_confidence = 0;  // a round ends at a draft less confident than this
  int max_model_len = 0;       // the generators' context (0: the longest prompt + new_tokens)
};

// The generators' context: --max_model_len, else what the benchmark's requests need (the same
// on every rank of a pipeline).
absl::StatusOr<int> GenerateBenchContext(const ModelConfig& c, const Tokenizer& tok,
                                         const GenerateBenchOptions& o);

// Prints one table row per threshold (and per drafting exit). Prompts: a fixed set of short English
// phrases, cycled.
absl::Status RunGenerateBenchmark(Model* model, const Tokenizer& tok,
                                  const GenerateBenchOptions& o);

// Under mpirun (--pp, --tp): every rank calls it with its stage's pipeline; the leader (rank 0)
// also holds the whole model `whole` (null elsewhere) and generates the same batch with it in
// one process, then the pipeline does; it prints a row per threshold.
absl::Status RunPipelineGenerateBenchmark(Model* whole, PipelineGenerator* pipeline,
                                          const Tokenizer& tok, const GenerateBenchOptions& o);

}  // namespace eellm
