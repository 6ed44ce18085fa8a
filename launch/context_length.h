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

// OK when `tokens` of `bytes_per_token` fit in `available` bytes (< 0: unknown, assumed to fit)
// with a tenth left for everything else; otherwise an error naming the sizes, `sized_by` (what
// set the token count) and the flags that shrink it.
absl::Status CheckKvCacheFits(int64_t tokens, int64_t bytes_per_token, int64_t available,
                              absl::string_view sized_by);

// "1.5 GB" (10^9 bytes), "12 MB".
std::string ByteSize(int64_t bytes);

}  // namespace eellm
