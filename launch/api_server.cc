#include "launch/api_server.h"

#include <httplib.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/timer.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

const std::set<std::string>& KnownFields() {
  static const std::set<std::string> known = {
      "prompts",       "tokens_to_generate", "temperature",      "top_k",
      "top_p",         "random_seed",        "add_BOS",          "stop_sequences",
      "logprobs",      "use_early_exit",     "early_exit_thres", "exit_layers",
      "print_max_prob"};
  return known;
}

// A short rendering of a bad value: scalars as JSON, lists and objects of scalars likewise, and
// nested ones by their type (dumping a value nested 100,000 deep would overflow the stack).
std::string Show(const json& v) {
  bool flat = true;
  if (v.is_structured()) {
    for (const json& e : v) flat &= !e.is_structured();
  }
  std::string s = flat ? v.dump(-1, ' ', false, json::error_handler_t::replace)
                       : absl::StrCat("a nested ", v.type_name());
  if (s.size() > 200) s = absl::StrCat(s.substr(0, 200), "...");
  return s;
}

absl::Status Bad(const std::string& field, const std::string& want, const json& got) {
  return absl::InvalidArgumentError(
      absl::StrCat("\"", field, "\" must be ", want, ", got ", Show(got)));
}

// Reads body[field] into *out when present; `ok` checks the value.
template <typename T, typename Check>
absl::Status Read(const json& body, const char* field, const char* want, T* out, Check ok) {
  auto it = body.find(field);
  if (it == body.end()) return absl::OkStatus();
  const json& v = *it;
  bool type_ok;
  if constexpr (std::is_same_v<T, bool>) {
    type_ok = v.is_boolean();
  } else if constexpr (std::is_integral_v<T>) {
    // An integer, or a float with an integral value (64.0), within T's range.
    const double d = v.is_number() ? v.get<double>() : 0.5;
    type_ok = v.is_number() && std::trunc(d) == d &&
              d >= static_cast<double>(std::numeric_limits<T>::min()) &&
              d <= static_cast<double>(std::numeric_limits<T>::max()) && std::fabs(d) < 9e15;
  } else {
    type_ok = v.is_number();
  }
  if (!type_ok) return Bad(field, want, v);
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    *out = static_cast<T>(v.is_number_integer() ? v.get<int64_t>()
                                                : static_cast<int64_t>(v.get<double>()));
  } else {
    *out = v.get<T>();
  }
  if (!ok(*out)) return Bad(field, want, v);
  return absl::OkStatus();
}

absl::Status ReadStrings(const json& body, const char* field, std::vector<std::string>* out) {
  auto it = body.find(field);
  if (it == body.end()) return absl::OkStatus();
  if (!it->is_array()) return Bad(field, "a list of strings", *it);
  for (const json& s : *it) {
    if (!s.is_string()) return Bad(field, "a list of strings", *it);
    out->push_back(s.get<std::string>());
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ApiCall> ParseApiRequest(const std::string& body_text, const Tokenizer& tok,
                                        const ApiDefaults& defaults, uint64_t request_number) {
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return absl::InvalidArgumentError("the request body is not JSON");
  if (!body.is_object())
    return absl::InvalidArgumentError("the request body must be a JSON object");
  for (const auto& [key, value] : body.items()) {
    if (!KnownFields().count(key)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown field \"", key, "\" (known: ", absl::StrJoin(KnownFields(), ", "), ")"));
    }
  }
  ApiCall call;
  if (!body.contains("prompts")) return absl::InvalidArgumentError("\"prompts\" is required");
  RETURN_IF_ERROR(ReadStrings(body, "prompts", &call.prompts));
  const int n = static_cast<int>(call.prompts.size());
  if (n < 1 || n > defaults.max_prompts) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"prompts\" must hold 1 to ", defaults.max_prompts, " strings, got ", n));
  }
  int tokens = 64, top_k = 0;
  double temperature = 1.0, top_p = 0.0, threshold = defaults.early_exit_threshold;
  int64_t seed =
      static_cast<int64_t>((defaults.seed + 1000003ull * request_number) & 0x1fffffffffffffull);
  bool add_bos = false, use_ee = body.contains("early_exit_thres"), print_max_prob = false;
  std::vector<int64_t> exit_layers;
  RETURN_IF_ERROR(
      Read(body, "tokens_to_generate", "an integer >= 1", &tokens, [](int v) { return v >= 1; }));
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
  RETURN_IF_ERROR(Read(body, "print_max_prob",
                       "false (not supported; \"layers\" gives each "
                       "token's exit depth)",
                       &print_max_prob, [](bool v) { return !v; }));
  RETURN_IF_ERROR(ReadStrings(body, "stop_sequences", &call.stop_sequences));
  for (const std::string& s : call.stop_sequences) {
    if (s.empty()) return absl::InvalidArgumentError("\"stop_sequences\" may not hold \"\"");
  }
  if (auto it = body.find("exit_layers"); it != body.end()) {
    if (!it->is_array()) return Bad("exit_layers", "a list of integers", *it);
    for (const json& v : *it) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 1000000) {
        return Bad("exit_layers", "a list of layer numbers", *it);
      }
      exit_layers.push_back(v.get<int64_t>());
    }
  }
  for (int i = 0; i < n; ++i) {
    GenerationRequest r;
    if (add_bos || call.prompts[i].empty()) r.prompt.push_back(tok.bos_id());
    const std::vector<int32_t> ids = tok.Encode(call.prompts[i]);
    r.prompt.insert(r.prompt.end(), ids.begin(), ids.end());
    r.max_new_tokens = tokens;
    r.eos_id = tok.eos_id();
    r.sampling.temperature = static_cast<float>(temperature);
    r.sampling.top_k = top_k;
    r.sampling.top_p = top_p == 0 ? 1.0f : static_cast<float>(top_p);
    r.sampling.seed = static_cast<uint64_t>(seed) + i;
    r.early_exit.threshold = use_ee ? static_cast<float>(threshold) : 1.0f;
    for (int64_t l : exit_layers) r.early_exit.exit_layers.push_back(static_cast<int>(l));
    if (!call.stop_sequences.empty()) {
      r.stop = [&tok, stops = call.stop_sequences](const std::vector<int32_t>& generated) {
        const std::string text = tok.Decode(generated);
        for (const std::string& s : stops) {
          if (text.find(s) != std::string::npos) return true;
        }
        return false;
      };
    }
    call.requests.push_back(std::move(r));
  }
  return call;
}

std::string ApiResponse(const ApiCall& call, const std::vector<GenerationResult>& results,
                        const Tokenizer& tok) {
  json text = json::array(), segments = json::array(), logprobs = json::array(),
       layers = json::array(), finish = json::array();
  for (size_t i = 0; i < results.size(); ++i) {
    const GenerationResult& g = results[i];
    std::string out = tok.Decode(g.tokens);
    size_t cut = std::string::npos;
    for (const std::string& s : call.stop_sequences) cut = std::min(cut, out.find(s));
    if (cut != std::string::npos) out.resize(cut);
    text.push_back(call.prompts[i] + out);
    json seg = json::array();
    for (int32_t t : call.requests[i].prompt) seg.push_back(tok.DecodeToken(t));
    for (int32_t t : g.tokens) seg.push_back(tok.DecodeToken(t));
    segments.push_back(std::move(seg));
    logprobs.push_back(g.logprobs);
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
  http_->set_payload_max_length(16u << 20);
  // Each request waits in a handler thread while it generates: enough threads that waiting
  // requests can fill every slot, and a few more for /health and errors.
  const size_t threads = service_->generator().max_sequences() + 8;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  auto generate = [this](const httplib::Request& req, httplib::Response& res) {
    Timer timer;
    auto call = ParseApiRequest(req.body, *tok_, defaults_, requests_++);
    absl::StatusOr<std::vector<GenerationResult>> results =
        call.ok() ? service_->Generate(call->requests) : call.status();
    if (!results.ok()) {
      const bool bad = results.status().code() == absl::StatusCode::kInvalidArgument;
      Answer(res, bad ? 400 : 500, {{"error", std::string(results.status().message())}});
      std::fprintf(stderr, "%s %s from %s: %d %s\n", req.method.c_str(), req.path.c_str(),
                   req.remote_addr.c_str(), res.status,
                   std::string(results.status().message()).c_str());
      return;
    }
    res.set_content(ApiResponse(*call, *results, *tok_), "application/json");
    size_t tokens = 0;
    double layers = 0;
    for (const GenerationResult& g : *results) {
      tokens += g.tokens.size();
      for (int d : g.depth) layers += d;
    }
    const double s = timer.Seconds();
    std::fprintf(stderr,
                 "%s %s from %s: %zu prompts, %zu tokens in %.3f s (%.1f tokens/s), average "
                 "layers %.2f of %d\n",
                 req.method.c_str(), req.path.c_str(), req.remote_addr.c_str(), results->size(),
                 tokens, s, s > 0 ? tokens / s : 0.0, tokens ? layers / tokens : 0.0,
                 config_.num_layers);
  };
  http_->Put("/api", generate);
  http_->Post("/api", generate);
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
            {"served",
             {{"requests", st.requests},
              {"sequences", st.sequences},
              {"steps", st.steps},
              {"tokens", st.tokens},
              {"largest_batch", st.largest_batch}}}});
  });
  http_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const std::string what =
        res.status == 404 || res.status == 405
            ? absl::StrCat("no such endpoint: ", req.method, " ", req.path,
                           " (the API is PUT or POST /api, and GET /health)")
            : absl::StrCat("HTTP status ", res.status,
                           res.status == 413 ? " (the body exceeds 16 MiB)" : "");
    Answer(res, res.status, {{"error", what}});
  });
}

ApiServer::~ApiServer() = default;

absl::StatusOr<int> ApiServer::Bind(const std::string& host, int port) {
  if (port == 0) {
    const int p = http_->bind_to_any_port(host);
    if (p < 0) return absl::UnavailableError(absl::StrCat("cannot bind to any port on ", host));
    return p;
  }
  if (!http_->bind_to_port(host, port)) {
    return absl::UnavailableError(
        absl::StrCat("cannot bind to ", host, ":", port, " (in use, or not an address here)"));
  }
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
