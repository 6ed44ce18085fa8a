// How many tokens one generated sequence may hold (the generator's context), and whether its KV
// cache fits in memory. Long-context models (Llama 3.1: 131,072 tokens) would otherwise allocate
// a whole context per sequence: `--max_model_len` (vLLM's name) caps it, `eellm generate` sizes
// it to the prompt and its completion, and `eellm serve` refuses a KV cache larger than the
// memory free, naming the sizes, instead of failing inside an allocation.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "models/model_config.h"

namespace eellm {

// `max_model_len` > 0: it (at most the model's max_seq_len, else an error naming both);
// otherwise `needed` > 0: min(needed, max_seq_len) (requests longer than the model's context are
// refused later, by name); otherwise the model's max_seq_len.
absl::StatusOr<int> ContextLength(const ModelConfig& c, int max_model_len, int64_t needed);

// OK when `bytes` (a generator's, Generator::PlannedBytes: a KV cache of `kv_tokens`, its size
// set by `sized_by`, and buffers for passes of a context) fit in `available` bytes (< 0:
// unknown, assumed to fit) with a tenth left for everything else; otherwise an error naming the
// sizes and the flags that shrink them.
absl::Status CheckGeneratorFits(int64_t bytes, int64_t kv_tokens, int64_t available,
                                absl::string_view sized_by);

// Memory free to each of the `local_ranks` processes on this machine sharing `available` bytes
// of host memory (a CPU backend's); a device's is its own.
int64_t AvailablePerProcess(int64_t available, bool host_memory, int local_ranks);

// "1.5 GB" (10^9 bytes), "12 MB".
std::string ByteSize(int64_t bytes);

}  // namespace eellm
