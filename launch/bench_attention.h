// The attention benchmark behind `eellm bench attention`: the backend's causal attention alone at
// one model's attention shape, forward and backward, in the backend's operand dtype; TFLOP/s
// counted as the profiler counts them (engine/profiling_backend.cc: forward 4 d b hq t (t + 1) / 2,
// backward 2.5 times that), to set beside tools/bench_attention_torch.py (PyTorch's SDPA at the
// same shape) and to compare attention kernels without running a whole training step. Then a
// decoding step as serving runs it: one new token for each of the b sequences, t tokens cached in
// 16-token pages (Backend::PagedAttentionPass), as GB/s of the cache it reads (K and V of every
// cached token once) against the copy bandwidth measured in the same run.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "models/model_config.h"

namespace eellm {

struct AttentionBenchOptions {
  int batch = 4, seq = 0;  // seq 0: the model's max_seq_len
  int steps = 10, warmup = 3;
  uint64_t seed = 1;
};

struct AttentionBenchResult {
  double forward_seconds = 0, backward_seconds = 0;  // medians over the timed runs
  double forward_flops = 0, backward_flops = 0;
  double decode_seconds = 0, decode_bytes = 0;  // the decoding step; the cache bytes it reads
  double copy_bandwidth = 0;                    // bytes/s
};

// Times AttentionForward, AttentionBackward and a decoding step on random inputs (each run
// synchronised) and prints a line for each.
absl::StatusOr<AttentionBenchResult> RunAttentionBenchmark(const ModelConfig& mc, Backend* be,
                                                           const AttentionBenchOptions& o);

}  // namespace eellm
