// The HTTP inference API of `eellm serve`, compatible with EE-LLM's (Megatron's) text generation
// server: PUT /api (POST also) with {"prompts": [...], "tokens_to_generate": 64, ...} answers
// {"text": [...], "segments": [...], "logprobs": [...]}, plus each token's exit depth. Also
// POST /v1/completions and GET /v1/models, OpenAI-style (launch/openai_api.h). GET /health
// describes the model and the service's counters. Requests run on a GenerationService, so
// concurrent requests are batched together, never interleaved on one KV cache. A bad request
// answers 400 with {"error": "..."} naming the field and value.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/generation_service.h"
#include "models/model_config.h"
#include "models/tokenizer.h"

namespace httplib {
class Server;
struct Response;
}  // namespace httplib

namespace eellm {

struct ApiDefaults {
  // early_exit_thres when a request sets use_early_exit without it.
  float early_exit_threshold = 0.8f;
  int max_prompts = 128;  // per request (EE-LLM's limit)
  // random_seed when a request gives none: seed + 1000003 * request number.
  uint64_t seed = 1234;
  std::string model_name = "eellm";  // what /v1/models and /v1/completions call the model
  // /v1/chat/completions' prompt format (launch/chat_template.h): auto, chatml, llama3 or plain.
  std::string chat_template = "auto";
  // Tokens of a sequence's context (prompt + generated; 0: unknown): a chat request without
  // max_tokens generates at most what is left of it. ApiServer sets it from its generator.
  int context = 0;
};

// A parsed request: one GenerationRequest per prompt, and what the response needs.
struct ApiCall {
  std::vector<std::string> prompts;
  std::vector<GenerationRequest> requests;
  std::vector<std::string> stop_sequences;
  bool logprobs = false;
  bool echo = false;     // the answer's text and logprobs start at the prompt (/api: echo_prompts)
  int top_logprobs = 0;  // /v1/completions: most likely tokens per position in the answer
  bool stream = false;   // /v1/completions: answer as server-sent events
  bool stream_usage = false;  // ... ending with a usage event (stream_options.include_usage)
  bool chat = false;          // /v1/chat/completions: answer as chat completions
  int n = 1;                  // OpenAI's n: choices (requests) per prompt
  bool no_log = false;        // /api: no log line for the request
};

// Parses and checks a request body. Fields (EE-LLM's names and defaults; all optional but
// "prompts"):
//   prompts            list of 1..max_prompts strings, or one string
//   tokens_to_generate integer >= 0 (64); 0 scores the prompt only (with logprobs)
//   temperature        >= 0, 0 = greedy (0); top_k >= 0, 0 = all (0); top_p in [0, 1], 0 = off
//   random_seed        integer >= 0; prompt i samples with random_seed + i
//   add_BOS            prepend the tokenizer's BOS (false); an empty prompt always starts with it
//   stop_sequences     list of strings: a prompt stops when its text contains one, and its text
//                      is cut before it
//   echo_prompts       the answer's text, segments and logprobs start at the prompt (false; the
//                      prompt is always scored with tokens_to_generate 0)
//   logprobs           return the log-probability of every token (false): with the prompt, of
//                      each after the first, prompt tokens from the final head
//   use_early_exit     early exit (false); on only when given and true, as EE-LLM turns it on
//                      only when the key is present
//   early_exit_thres   confidence threshold in (0, 1] (ApiDefaults::early_exit_threshold)
//   exit_layers        layers of the exits allowed to fire (all)
//   no_log             no log line for the request (false)
//   print_max_prob, top_p_decay, top_p_bound, prevent_newline_after_colon, beam_width,
//   length_penalty     accepted at their neutral values only (false, 0, 0, false, 1, any)
// Unknown fields and wrong types are errors.
absl::StatusOr<ApiCall> ParseApiRequest(const std::string& body, const Tokenizer& tok,
                                        const ApiDefaults& defaults, uint64_t request_number);

// The JSON response: "text" (the generated text, cut before a stop sequence, after the prompt
// with echo_prompts or tokens_to_generate 0), "segments" (the text of each of those tokens),
// "logprobs" (when asked: each generated token's from the head that produced it, after those of
// the prompt's tokens but the first, from the final head, when the prompt is echoed),
// "layers" (layers each generated token ran), "finish_reason" ("length", "eos" or "stop").
std::string ApiResponse(const ApiCall& call, const std::vector<GenerationResult>& results,
                        const Tokenizer& tok);

class ApiServer {
 public:
  ApiServer(GenerationService* service, const Tokenizer* tok, const ModelConfig& config,
            const ApiDefaults& defaults);
  ~ApiServer();
  // Binds to host:port (port 0: any free port); returns the port.
  absl::StatusOr<int> Bind(const std::string& host, int port);
  // Answers requests until Stop() (from another thread); returns at once after an earlier
  // Stop(). A Stop() racing with the start of Serve() may be missed: call it until Serve()
  // returns.
  void Serve();
  void Stop();

 private:
  // Answers a /v1/completions request with "stream": true (validated) as server-sent events.
  void Stream(std::shared_ptr<ApiCall> call, uint64_t number, httplib::Response& res);

  GenerationService* service_;
  const Tokenizer* tok_;
  ModelConfig config_;
  ApiDefaults defaults_;
  std::atomic<uint64_t> requests_{0};
  std::atomic<bool> stop_requested_{false};
  std::unique_ptr<httplib::Server> http_;
};

}  // namespace eellm
