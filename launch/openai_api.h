// The OpenAI-style completions API of `eellm serve` (what vLLM users call): POST /v1/completions
// with {"prompt": "..." or [...], "max_tokens": 16, "temperature", "top_p", "stop", "seed",
// "logprobs", ...} answers {"id", "object": "text_completion", "created", "model", "choices":
// [{"text", "index", "logprobs", "finish_reason"}], "usage"}. Early exit is an extension:
// "early_exit_threshold" and "exit_layers" in the request, each choice's "layers" in the answer.
// "stream": true answers with server-sent events as tokens come (CompletionStream). "prompt" may
// be token ids. "echo" with "logprobs" scores the prompt too (max_tokens 0: only the prompt), as
// lm-evaluation-harness's loglikelihood tasks ask. "n" samples n completions of each prompt
// (choice index = prompt x n + sample, sampling seeds seed + index). Not supported (refused by
// name): best_of other than n, suffix, penalties, logit_bias, logprobs or echo when streaming.
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

// Where each token's text starts in the text of `ids` decoded together, in characters (code
// points, invalid UTF-8 counted as U+FFFD): the "text_offset" of logprobs. Linear in the ids when
// the tokenizer's shares (Tokenizer::DecodeShares) join into their decoded text (byte-level and
// SentencePiece-style tokenizers); otherwise each prefix is decoded (quadratic).
std::vector<size_t> TextOffsets(const Tokenizer& tok, const std::vector<int32_t>& ids);

// Parses a /v1/chat/completions body: "messages" (system, user and assistant turns, content as a
// string or text parts) rendered in defaults.chat_template's format (launch/chat_template.h) into
// one prompt, "max_tokens" or "max_completion_tokens" (256 by default), and the sampling,
// streaming, stop and early-exit fields of /v1/completions. The reply ends at the format's
// end-of-turn token. Refused by name: logprobs, tools, response formats other than text,
// penalties and logit_bias.
absl::StatusOr<ApiCall> ParseChatRequest(const std::string& body, const Tokenizer& tok,
                                         const ApiDefaults& defaults, uint64_t request_number);

// vLLM's POST /tokenize ({"prompt": text} or {"messages": [...]}, rendered as chat requests are:
// {"count", "max_model_len", "tokens"}) and POST /detokenize ({"tokens": [...]}: {"prompt"}).
absl::StatusOr<std::string> TokenizeAnswer(const std::string& body, const Tokenizer& tok,
                                           const ApiDefaults& defaults);
absl::StatusOr<std::string> DetokenizeAnswer(const std::string& body, const Tokenizer& tok);

// An OpenAI-style error body: {"error": {"message", "type": "invalid_request_error", ...}}.
std::string CompletionError(const std::string& message, bool bad_request);

// A streamed completion as server-sent events ("data: {...}\n\n", then "data: [DONE]\n\n").
// Each event carries one choice's new text (chat: "chat.completion.chunk" events whose "delta"
// holds the new "content", the first also the "role"). A possible start of a stop string and an
// incomplete UTF-8 character at the end are held back until the next tokens show what they are.
class CompletionStream {
 public:
  CompletionStream(const ApiCall& call, const Tokenizer& tok, std::string model,
                   uint64_t request_number, int64_t created);
  // The event for choice `index` after `token` ("" when no new text can be sent yet).
  std::string OnToken(int index, int32_t token);
  // The choices' remaining text and finish reasons, then [DONE].
  std::string Finish(const std::vector<GenerationResult>& results);

 private:
  std::string Event(int index, const std::string& text, const char* finish);
  const ApiCall& call_;
  const Tokenizer& tok_;
  std::string model_, id_;
  int64_t created_;
  std::vector<std::vector<int32_t>> tokens_;  // per choice
  std::vector<size_t> sent_;                  // per choice: bytes of its text sent
  std::vector<bool> role_sent_;               // per choice (chat): the role went out
};

}  // namespace eellm
