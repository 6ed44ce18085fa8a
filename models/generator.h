// Early-exit generation for one sequence with a KV cache: prefill + decode, sampling, and
// EE-LLM's KV recomputation. The exits are checked in depth order on the newest token; the
// first whose max probability (after its temperature) reaches the threshold wins. A token that
// exits at depth D leaves layers D+1.. without its K/V; those rows stay "pending" (their hidden
// state at their depth is kept) and the next forward pass carries them through the missing
// layers together with the new token. Pending depths never increase with position, so the rows
// missing at each layer form a suffix and each layer runs one batched pass.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "models/layers.h"
#include "models/sampler.h"
#include "models/transformer.h"

namespace eellm {

struct EarlyExitParams {
  float threshold = 1.0f;        // >= 1 disables early exit (full-model output)
  std::vector<int> exit_layers;  // layer numbers of exits allowed to fire; empty = all
};

struct StepResult {
  int exit_index = -1;        // exit that fired, -1 for the final head
  int depth = 0;              // layers computed for the newest token
  std::vector<float> logits;  // [vocab] of the head that produced the token (before temperature)
  float temperature = 1.0f;   // that head's temperature
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated tokens (prompt excluded)
  std::vector<int> exit_index;  // per generated token: exit that produced it, -1 final
  std::vector<int> depth;       // per generated token: layers computed
  double prefill_seconds = 0, decode_seconds = 0;
  bool stopped_at_eos = false;
  double AverageLayers() const;
  double DecodeTokensPerSecond() const;
};

class Generator {
 public:
  // `capacity`: most tokens (prompt + generated) one sequence may hold.
  Generator(Model* model, int capacity);

  absl::StatusOr<GenerationResult> Generate(const std::vector<int32_t>& prompt, int max_new_tokens,
                                            int eos_id, const SamplingParams& sampling,
                                            const EarlyExitParams& ee,
                                            const std::function<void(int32_t)>& on_token = nullptr);

  // ---- lower level (tests) -----------------------------------------------------------------
  void Reset();
  // Appends `ids` and runs the forward pass; returns the newest token's head output.
  StepResult Step(const std::vector<int32_t>& ids, const EarlyExitParams& ee);
  // Completes the deep K/V of pending tokens.
  void FinishPending();
  int length() const { return len_; }
  int pending_start() const { return pending_start_; }
  const KvLayer& kv(int layer) const { return kv_[layer]; }

 private:
  bool ExitAllowed(int i, const EarlyExitParams& ee) const;
  // Runs rows [pending_start_, len_ + n_new) forward; checks exits when `ee` is non-null.
  StepResult Forward(int n_new, const EarlyExitParams* ee);
  // Checks exit i on the newest row; fills `out` and returns true when it fires.
  // Block exits also fill their own K/V here for every row reaching their depth.
  bool TryExit(int i, const float* in_rows, int m, int rows, const EarlyExitParams* ee,
               StepResult* out);

  Model* model_;
  Backend* be_;
  int capacity_;
  Arena arena_;
  std::vector<KvLayer> kv_;
  std::vector<KvLayer> exit_kv_;  // block exits only
  BlockActs acts_;
  std::vector<ExitActs> exit_acts_;
  NormActs final_norm_;
  float *hidden_, *frontier_, *logits_;  // [capacity, c], [capacity, c], [vocab]
  int32_t *ids_, *pos_;                  // [capacity]
  std::vector<int> depth_;               // per position
  int len_ = 0, pending_start_ = 0;
  bool fill_exit_kv_ = false;  // block exits keep their K/V (exits active)
};

}  // namespace eellm
