#include "launch/api_server.h"

#include <dirent.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/timer.h"
#include "launch/api_fields.h"
#include "launch/metrics.h"
#include "launch/openai_api.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using api::Bad;
using api::Read;
using api::ReadStrings;
using nlohmann::json;

const std::set<std::string>& KnownFields() {
  static const std::set<std::string> known = {"prompts",
                                              "tokens_to_generate",
                                              "temperature",
                                              "top_k",
                                              "top_p",
                                              "random_seed",
                                              "add_BOS",
                                              "stop_sequences",
                                              "logprobs",
                                              "use_early_exit",
                                              "early_exit_thres",
                                              "exit_layers",
                                              "print_max_prob",
                                              "echo_prompts",
                                              "no_log",
                                              "top_p_decay",
                                              "top_p_bound",
                                              "prevent_newline_after_colon",
                                              "beam_width",
                                              "length_penalty",
                                              "draft_exit_layer",
                                              "draft_tokens",
                                              "draft_confidence"};
  return known;
}

}  // namespace

absl::StatusOr<ApiCall> ParseApiRequest(const std::string& body_text, const Tokenizer& tok,
                                        const ApiDefaults& defaults, uint64_t request_number) {
  ASSIGN_OR_RETURN(const json body, api::ParseJsonBody(body_text, KnownFields()));
  ApiCall call;
  if (!body.contains("prompts")) return absl::InvalidArgumentError("\"prompts\" is required");
  if (body["prompts"].is_string()) {  // one prompt, as EE-LLM's server takes it
    call.prompts.push_back(body["prompts"].get<std::string>());
  } else {
    RETURN_IF_ERROR(ReadStrings(body, "prompts", &call.prompts));
  }
  const int n = static_cast<int>(call.prompts.size());
  if (n < 1 || n > defaults.max_prompts) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"prompts\" must hold 1 to ", defaults.max_prompts, " strings, got ", n));
  }
  int tokens = 64, top_k = 0;
  double temperature = 0.0, top_p = 0.0, threshold = defaults.early_exit_threshold;
  int64_t seed =
      static_cast<int64_t>((defaults.seed + 1000003ull * request_number) & 0x1fffffffffffffull);
  bool add_bos = false, use_ee = false, print_max_prob = false;
  std::vector<int> exit_layers;
  RETURN_IF_ERROR(
      Read(body, "tokens_to_generate", "an integer >= 0", &tokens, [](int v) { return v >= 0; }));
  RETURN_IF_ERROR(Read(body, "temperature", "a number in [0, 1e30] (0 = greedy)", &temperature,
                       [](double v) { return v >= 0 && v <= 1e30; }));
  RETURN_IF_ERROR(Read(body, "top_k", "an integer >= 0", &top_k, [](int v) { return v >= 0; }));
  RETURN_IF_ERROR(Read(body, "top_p", "a number in [0, 1] (0 = off)", &top_p,
                       [](double v) { return v >= 0 && v <= 1; }));
  RETURN_IF_ERROR(
      Read(body, "random_seed", "an integer >= 0", &seed, [](int64_t v) { return v >= 0; }));
  RETURN_IF_ERROR(Read(body, "add_BOS", "true or false", &add_bos, [](bool) { return true; }));
  RETURN_IF_ERROR(
      Read(body, "logprobs", "true or false", &call.logprobs, [](bool) { return true; }));
  RETURN_IF_ERROR(
      Read(body, "use_early_exit", "true or false", &use_ee, [](bool) { return true; }));
  RETURN_IF_ERROR(Read(body, "early_exit_thres", "a number in (0, 1]", &threshold,
                       [](double v) { return v > 0 && v <= 1; }));
  RETURN_IF_ERROR(
      Read(body, "echo_prompts", "true or false", &call.echo, [](bool) { return true; }));
  RETURN_IF_ERROR(Read(body, "no_log", "true or false", &call.no_log, [](bool) { return true; }));
  // Megatron's sampling and beam-search fields, at their neutral values only.
  double decay = 0, bound = 0, length_penalty = 1;
  bool newline_after_colon = false;
  int beam_width = 1;
  RETURN_IF_ERROR(
      Read(body, "top_p_decay", "0 (not supported)", &decay, [](double v) { return v == 0; }));
  RETURN_IF_ERROR(
      Read(body, "top_p_bound", "0 (not supported)", &bound, [](double v) { return v == 0; }));
  RETURN_IF_ERROR(Read(body, "prevent_newline_after_colon", "false (not supported)",
                       &newline_after_colon, [](bool v) { return !v; }));
  RETURN_IF_ERROR(Read(body, "beam_width", "1 (beam search is not supported)", &beam_width,
                       [](int v) { return v == 1; }));
  RETURN_IF_ERROR(Read(body, "length_penalty", "a number (beam search only)", &length_penalty,
                       [](double) { return true; }));
  RETURN_IF_ERROR(Read(body, "print_max_prob",
                       "false (not supported; \"layers\" gives each "
                       "token's exit depth)",
                       &print_max_prob, [](bool v) { return !v; }));
  RETURN_IF_ERROR(ReadStrings(body, "stop_sequences", &call.stop_sequences));
  for (const std::string& s : call.stop_sequences) {
    if (s.empty()) return absl::InvalidArgumentError("\"stop_sequences\" may not hold \"\"");
  }
  RETURN_IF_ERROR(api::ReadLayers(body, "exit_layers", &exit_layers));
  if (tokens == 0) call.logprobs = true;  // scoring the prompts only, as EE-LLM's server
  api::GenerationOptions o;
  RETURN_IF_ERROR(api::ReadSpeculative(body, &o.speculative));
  o.prompt_logprobs = call.logprobs && (call.echo || tokens == 0);
  o.max_new_tokens = tokens;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p == 0 ? 1.0 : top_p;
  o.seed = static_cast<uint64_t>(seed);
  o.add_bos = add_bos;
  o.threshold = use_ee ? threshold : 1.0;
  o.exit_layers = exit_layers;
  api::AddGenerationRequests(o, tok, &call);
  return call;
}

std::string ApiResponse(const ApiCall& call, const std::vector<GenerationResult>& results,
                        const Tokenizer& tok) {
  json text = json::array(), segments = json::array(), logprobs = json::array(),
       layers = json::array(), finish = json::array();
  for (size_t i = 0; i < results.size(); ++i) {
    const GenerationResult& g = results[i];
    // The prompt leads the answer when echoed, and when it is all there is (scoring).
    const bool echo = call.echo || call.requests[i].max_new_tokens == 0;
    const std::string out = api::GeneratedText(g, call.stop_sequences, tok);
    text.push_back(echo ? call.prompts[i] + out : out);
    json seg = json::array();
    if (echo) {
      for (int32_t t : call.requests[i].prompt) seg.push_back(tok.DecodeToken(t));
    }
    for (int32_t t : g.tokens) seg.push_back(tok.DecodeToken(t));
    segments.push_back(std::move(seg));
    std::vector<float> all;  // with the prompt: every token's after the first
    if (echo) all = g.prompt_logprobs;
    all.insert(all.end(), g.logprobs.begin(), g.logprobs.end());
    logprobs.push_back(std::move(all));
    layers.push_back(g.depth);
    finish.push_back(FinishReasonName(g.finish));
  }
  json r = {{"text", text}, {"segments", segments}, {"layers", layers}, {"finish_reason", finish}};
  if (call.logprobs) r["logprobs"] = logprobs;
  return r.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

void Answer(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

}  // namespace

ApiServer::ApiServer(GenerationService* service, const Tokenizer* tok, const ModelConfig& config,
                     const ApiDefaults& defaults)
    : service_(service),
      tok_(tok),
      config_(config),
      defaults_(defaults),
      http_(std::make_unique<httplib::Server>()) {
  if (defaults_.context == 0) defaults_.context = service_->generator().capacity();
  http_->set_payload_max_length(16u << 20);
  // SO_REUSEADDR alone: httplib's default, SO_REUSEPORT, lets a second server bind the same port
  // and the kernel then splits the connections between the two, answering from either model.
  http_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // Each request waits in a handler thread while it generates, and a keep-alive connection holds
  // its thread between requests (up to 5 s). So there are threads for twice the slots, at least
  // 64, and 8 more for /health and errors: waiting requests then queue in the service, in
  // arrival order, rather than for a thread. Measured with 48 keep-alive clients and 16 slots:
  // with 24 threads the p99 latency was 0.59-0.62 s (p50 0.11 s) and 7,600-7,800 tokens/s; with
  // 72, 0.23 s (p50 0.18 s) and 8,300.
  const int slots = service_->generator().max_sequences();
  const size_t threads = std::min(std::max(64, 2 * slots), slots + 1024) + 8;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  // Both APIs: parse, generate, answer, and log one line per request.
  enum class Api { kEeLlm, kOpenAi, kOpenAiChat };
  auto handler = [this](Api api) {
    return [this, api](const httplib::Request& req, httplib::Response& res) {
      Timer timer;
      const uint64_t number = requests_++;
      auto call = api == Api::kEeLlm    ? ParseApiRequest(req.body, *tok_, defaults_, number)
                  : api == Api::kOpenAi ? ParseCompletionRequest(req.body, *tok_, defaults_, number)
                                        : ParseChatRequest(req.body, *tok_, defaults_, number);
      if (call.ok() && call->stream) {
        // Validate now, so that a bad prompt still answers 400 rather than an event.
        absl::Status valid = service_->generator().ValidateAll(call->requests);
        if (valid.ok()) {
          Stream(std::make_shared<ApiCall>(std::move(*call)), number, res);
          return;
        }
        call = valid;
      }
      absl::StatusOr<std::vector<GenerationResult>> results =
          call.ok() ? service_->Generate(call->requests) : call.status();
      if (!results.ok()) {
        const bool bad = results.status().code() == absl::StatusCode::kInvalidArgument;
        const std::string message(results.status().message());
        res.status = bad ? 400 : 500;
        res.set_content(api == Api::kEeLlm ? json{{"error", message}}.dump(
                                                 -1, ' ', false, json::error_handler_t::replace)
                                           : CompletionError(message, bad),
                        "application/json");
        std::fprintf(stderr, "%s %s from %s: %d %s\n", req.method.c_str(), req.path.c_str(),
                     req.remote_addr.c_str(), res.status, message.c_str());
        return;
      }
      res.set_content(api == Api::kEeLlm
                          ? ApiResponse(*call, *results, *tok_)
                          : CompletionResponse(*call, *results, *tok_, defaults_.model_name, number,
                                               static_cast<int64_t>(time(nullptr))),
                      "application/json");
      size_t tokens = 0;
      double layers = 0;
      for (const GenerationResult& g : *results) {
        tokens += g.tokens.size();
        for (int d : g.depth) layers += d;
      }
      const double s = timer.Seconds();
      if (call->no_log) return;
      std::fprintf(stderr,
                   "%s %s from %s: %zu prompts, %zu tokens in %.3f s (%.1f tokens/s), average "
                   "layers %.2f of %d\n",
                   req.method.c_str(), req.path.c_str(), req.remote_addr.c_str(), results->size(),
                   tokens, s, s > 0 ? tokens / s : 0.0, tokens ? layers / tokens : 0.0,
                   config_.num_layers);
    };
  };
  http_->Put("/api", handler(Api::kEeLlm));
  http_->Post("/api", handler(Api::kEeLlm));
  http_->Post("/v1/completions", handler(Api::kOpenAi));
  http_->Post("/v1/chat/completions", handler(Api::kOpenAiChat));
  // vLLM's tokenizer endpoints.
  auto tokenizer_endpoint = [this](bool tokenize) {
    return [this, tokenize](const httplib::Request& req, httplib::Response& res) {
      auto answer =
          tokenize ? TokenizeAnswer(req.body, *tok_, defaults_) : DetokenizeAnswer(req.body, *tok_);
      if (answer.ok()) {
        res.set_content(*answer, "application/json");
      } else {
        res.status = 400;
        res.set_content(CompletionError(std::string(answer.status().message()), true),
                        "application/json");
      }
    };
  };
  http_->Post("/tokenize", tokenizer_endpoint(true));
  http_->Post("/detokenize", tokenizer_endpoint(false));
  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    Answer(res, 200,
           {{"object", "list"},
            {"data", json::array({{{"id", defaults_.model_name},
                                   {"object", "model"},
                                   {"owned_by", "eellm"},
                                   {"max_model_len", service_->generator().capacity()}}})}});
  });
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const GenerationService::Stats st = service_->stats();
    json exits = json::array();
    for (const ExitConfig& x : config_.exits) exits.push_back(x.layer);
    Answer(res, 200,
           {{"status", "ok"},
            {"model",
             {{"layers", config_.num_layers},
              {"hidden_size", config_.hidden_size},
              {"vocab_size", config_.vocab_size},
              {"context_length", service_->generator().capacity()},
              {"exit_layers", exits}}},
            {"max_batch", service_->generator().max_sequences()},
            {"kv_cache",
             {{"tokens", service_->generator().kv_tokens()}, {"in_use", st.kv_tokens_in_use}}},
            {"served",
             {{"requests", st.requests},
              {"sequences", st.sequences},
              {"cancelled", st.cancelled},
              {"steps", st.steps},
              {"tokens", st.tokens},
              {"largest_batch", st.largest_batch},
              {"preemptions", st.preemptions},
              {"prefix_cached_tokens", st.prefix_cached_tokens}}}});
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(PrometheusMetrics(service_->stats(), config_, service_->generator().kv_tokens(),
                                      service_->generator().max_sequences()),
                    "text/plain; version=0.0.4");
  });
  http_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const std::string what =
        res.status == 404 || res.status == 405
            ? absl::StrCat(
                  "no such endpoint: ", req.method, " ", req.path,
                  " (endpoints: PUT or POST /api, POST /v1/completions, POST /v1/chat/completions, "
                  "POST /tokenize, POST /detokenize, GET /v1/models, GET /health, GET /metrics)")
            : absl::StrCat("HTTP status ", res.status,
                           res.status == 413 ? " (the body exceeds 16 MiB)" : "");
    Answer(res, res.status, {{"error", what}});
  });
}

ApiServer::~ApiServer() = default;

void ApiServer::Stream(std::shared_ptr<ApiCall> call, uint64_t number, httplib::Response& res) {
  // The generation runs on a thread of its own, its tokens queued for this handler thread, which
  // writes them as events. A client that goes away cancels the rest.
  struct State {
    std::mutex mu;
    std::condition_variable changed;
    std::vector<std::pair<int, int32_t>> tokens;
    bool done = false;
    absl::StatusOr<std::vector<GenerationResult>> results;
    std::atomic<bool> cancelled{false};
  };
  res.set_chunked_content_provider("text/event-stream", [this, call, number](
                                                            size_t, httplib::DataSink& sink) {
    Timer timer;
    auto state = std::make_shared<State>();
    std::thread generation([this, call, state] {
      auto results = service_->Generate(
          call->requests,
          [state](int i, int32_t t) {
            std::lock_guard<std::mutex> lock(state->mu);
            state->tokens.emplace_back(i, t);
            state->changed.notify_one();
          },
          &state->cancelled);
      std::lock_guard<std::mutex> lock(state->mu);
      state->results = std::move(results);
      state->done = true;
      state->changed.notify_one();
    });
    CompletionStream stream(*call, *tok_, defaults_.model_name, number,
                            static_cast<int64_t>(time(nullptr)));
    bool writable = true;
    for (bool done = false; !done;) {
      std::vector<std::pair<int, int32_t>> tokens;
      {
        std::unique_lock<std::mutex> lock(state->mu);
        state->changed.wait(lock, [&] { return state->done || !state->tokens.empty(); });
        tokens.swap(state->tokens);
        done = state->done;
      }
      for (const auto& [i, t] : tokens) {
        const std::string event = stream.OnToken(i, t);
        if (writable && !event.empty() && !sink.write(event.data(), event.size())) {
          writable = false;
          state->cancelled = true;
        }
      }
    }
    generation.join();
    size_t count = 0;
    if (state->results.ok()) {
      for (const GenerationResult& g : *state->results) count += g.tokens.size();
    }
    if (writable) {
      const std::string end =
          state->results.ok()
              ? stream.Finish(*state->results)
              : absl::StrCat("data: ",
                             CompletionError(std::string(state->results.status().message()), false),
                             "\n\n");
      sink.write(end.data(), end.size());
      sink.done();
    }
    std::fprintf(stderr, "POST /v1/%scompletions (stream): %zu prompts, %zu tokens in %.3f s%s\n",
                 call->chat ? "chat/" : "", call->prompts.size(), count, timer.Seconds(),
                 writable ? "" : "; the client went away, the rest was cancelled");
    return writable;
  });
}

namespace {

// cpp-httplib listens with a backlog of 5 connections (CPPHTTPLIB_LISTEN_BACKLOG, compiled into
// Debian's library): a burst of more clients overflows it, and the kernel drops their handshakes,
// which clients retry only after a second (measured: 16 clients at once, a 1.1 s p90 latency and
// half the throughput in about half the runs). Listening again on the bound socket widens its
// backlog (Linux); the socket is found among this process's descriptors by its port.
void WidenListenBacklog(int port) {
  DIR* fds = opendir("/proc/self/fd");
  if (fds == nullptr) return;
  while (const dirent* e = readdir(fds)) {
    const int fd = std::atoi(e->d_name);
    int listening = 0;
    socklen_t size = sizeof(listening);
    if (fd <= 2 || getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 ||
        !listening) {
      continue;
    }
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) continue;
    const int bound = addr.ss_family == AF_INET
                          ? ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port)
                      : addr.ss_family == AF_INET6
                          ? ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port)
                          : -1;
    if (bound == port) ::listen(fd, SOMAXCONN);
  }
  closedir(fds);
}

}  // namespace

absl::StatusOr<int> ApiServer::Bind(const std::string& host, int port) {
  if (port == 0) {
    port = http_->bind_to_any_port(host);
    if (port < 0) {
      return absl::UnavailableError(absl::StrCat("cannot bind to any port on ", host));
    }
  } else if (!http_->bind_to_port(host, port)) {
    return absl::UnavailableError(
        absl::StrCat("cannot bind to ", host, ":", port, " (in use, or not an address here)"));
  }
  WidenListenBacklog(port);
  return port;
}

void ApiServer::Serve() {
  if (!stop_requested_) http_->listen_after_bind();
}

void ApiServer::Stop() {
  stop_requested_ = true;
  http_->stop();
}

}  // namespace eellm
