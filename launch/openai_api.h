// The OpenAI-style completions API of `eellm serve` (what vLLM users call): POST /v1/completions
// with {"prompt": "..." or [...], "max_tokens": 16, "temperature", "top_p", "stop", "seed",
// "logprobs", ...} answers {"id", "object": "text_completion", "created", "model", "choices":
// [{"text", "index", "logprobs", "finish_reason"}], "usage"}. Early exit is an extension:
// "early_exit_threshold" and "exit_layers" in the request, each choice's "layers" in the answer.
// Not supported (refused by name): n > 1, best_of > 1, stream, echo, suffix, penalties,
// logit_bias, top logprobs beyond the sampled token's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/api_server.h"
#include "models/tokenizer.h"

namespace eellm {

// Parses a /v1/completions body; errors name the field and value. The ApiCall's logprobs flag
// says whether to answer with each token's log-probability.
absl::StatusOr<ApiCall> ParseCompletionRequest(const std::string& body, const Tokenizer& tok,
                                               const ApiDefaults& defaults,
                                               uint64_t request_number);

// The /v1/completions answer. `created`: Unix seconds.
std::string CompletionResponse(const ApiCall& call, const std::vector<GenerationResult>& results,
                               const Tokenizer& tok, const std::string& model,
                               uint64_t request_number, int64_t created);

// An OpenAI-style error body: {"error": {"message", "type": "invalid_request_error", ...}}.
std::string CompletionError(const std::string& message, bool bad_request);

}  // namespace eellm
