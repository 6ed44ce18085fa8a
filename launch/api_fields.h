// JSON request reading shared by the HTTP APIs (api_server.cc: EE-LLM's /api; openai_api.cc:
// /v1/completions): typed fields with errors that name the field and the bad value, and the
// GenerationRequests a parsed request makes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status.h"
#include "launch/api_server.h"
#include "models/speculative.h"
#include "nlohmann/json.hpp"

namespace eellm::api {

using nlohmann::json;

// A short rendering of a bad value: scalars as JSON, lists and objects of scalars likewise, and
// nested ones by their type (dumping a value nested 100,000 deep would overflow the stack).
inline std::string Show(const json& v) {
  bool flat = true;
  if (v.is_structured()) {
    for (const json& e : v) flat &= !e.is_structured();
  }
  std::string s = flat ? v.dump(-1, ' ', false, json::error_handler_t::replace)
                       : absl::StrCat("a nested ", v.type_name());
  if (s.size() > 200) s = absl::StrCat(s.substr(0, 200), "...");
  return s;
}

inline absl::Status Bad(const std::string& field, const std::string& want, const json& got) {
  return absl::InvalidArgumentError(
      absl::StrCat("\"", field, "\" must be ", want, ", got ", Show(got)));
}

// Reads body[field] into *out when present and not null; `ok` checks the value.
template <typename T, typename Check>
absl::Status Read(const json& body, const char* field, const char* want, T* out, Check ok) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();  // null: the default
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

inline absl::Status ReadStrings(const json& body, const char* field,
                                std::vector<std::string>* out) {
  auto it = body.find(field);
  if (it == body.end()) return absl::OkStatus();
  if (!it->is_array()) return Bad(field, "a list of strings", *it);
  for (const json& s : *it) {
    if (!s.is_string()) return Bad(field, "a list of strings", *it);
    out->push_back(s.get<std::string>());
  }
  return absl::OkStatus();
}

// body[field], when present, as a list of layer numbers (the exits allowed to fire).
inline absl::Status ReadLayers(const json& body, const char* field, std::vector<int>* out) {
  auto it = body.find(field);
  if (it == body.end()) return absl::OkStatus();
  if (!it->is_array()) return Bad(field, "a list of layer numbers", *it);
  for (const json& v : *it) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 1000000) {
      return Bad(field, "a list of layer numbers", *it);
    }
    out->push_back(static_cast<int>(v.get<int64_t>()));
  }
  return absl::OkStatus();
}

// Parses a request body: a JSON object whose keys are all in `known`.
inline absl::StatusOr<json> ParseJsonBody(const std::string& text,
                                          const std::set<std::string>& known) {
  json body = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return absl::InvalidArgumentError("the request body is not JSON");
  if (!body.is_object()) {
    return absl::InvalidArgumentError("the request body must be a JSON object");
  }
  for (const auto& [key, value] : body.items()) {
    if (!known.count(key)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown field \"", key, "\" (known: ", absl::StrJoin(known, ", "), ")"));
    }
  }
  return body;
}

// What every prompt of a request shares.
struct GenerationOptions {
  int max_new_tokens = 64;
  double temperature = 1.0;  // 0 = greedy
  int top_k = 0;             // 0 = all
  double top_p = 1.0;        // 1 = all
  uint64_t seed = 0;         // prompt i samples with seed + i
  bool add_bos = false;      // an empty prompt always starts with BOS
  double threshold = 1.0;    // early exit; 1 = off
  std::vector<int> exit_layers;
  SpeculativeParams speculative;  // self-speculative decoding; exit_layer 0 = off
  bool prompt_logprobs = false;   // score the prompts too
  int top_logprobs = 0;
};

// The self-speculative decoding fields of either API: "draft_exit_layer" (the drafting exit's
// layer, 0 = off), "draft_tokens" (per round, at most) and "draft_confidence" (a round ends at a
// draft less confident than this).
inline absl::Status ReadSpeculative(const json& body, SpeculativeParams* out) {
  RETURN_IF_ERROR(Read(body, "draft_exit_layer", "a layer number >= 0 (0 = off)", &out->exit_layer,
                       [](int v) { return v >= 0; }));
  RETURN_IF_ERROR(Read(body, "draft_tokens",
                       absl::StrCat("an integer in [1, ", kMaxDraftTokens, "]").c_str(),
                       &out->draft_tokens, [](int v) { return v >= 1 && v <= kMaxDraftTokens; }));
  return Read(body, "draft_confidence", "a number in [0, 1]", &out->min_confidence,
              [](float v) { return v >= 0 && v <= 1; });
}

// call->n GenerationRequests per call->prompts (choice k = prompt k / n, sampling with seed + k),
// stopping at call->stop_sequences (matched on the generated text). `token_prompts`, when not
// empty, holds the prompts as token ids (and call->prompts their text).
inline void AddGenerationRequests(const GenerationOptions& o, const Tokenizer& tok, ApiCall* call,
                                  const std::vector<std::vector<int32_t>>& token_prompts = {}) {
  for (size_t k = 0; k < call->prompts.size() * call->n; ++k) {
    const size_t i = k / call->n;
    GenerationRequest r;
    if (o.add_bos || (call->prompts[i].empty() && token_prompts.empty())) {
      r.prompt.push_back(tok.bos_id());
    }
    const std::vector<int32_t> ids =
        token_prompts.empty() ? tok.Encode(call->prompts[i]) : token_prompts[i];
    r.prompt.insert(r.prompt.end(), ids.begin(), ids.end());
    r.max_new_tokens = o.max_new_tokens;
    r.eos_id = tok.eos_id();
    r.sampling.temperature = static_cast<float>(o.temperature);
    r.sampling.top_k = o.top_k;
    r.sampling.top_p = static_cast<float>(o.top_p);
    r.sampling.seed = o.seed + k;
    r.early_exit.threshold = static_cast<float>(o.threshold);
    r.early_exit.exit_layers = o.exit_layers;
    r.speculative = o.speculative;
    r.prompt_logprobs = o.prompt_logprobs;
    r.top_logprobs = o.top_logprobs;
    if (!call->stop_sequences.empty()) {
      r.stop = [&tok, stops = call->stop_sequences](const std::vector<int32_t>& generated) {
        const std::string text = tok.Decode(generated);
        for (const std::string& s : stops) {
          if (text.find(s) != std::string::npos) return true;
        }
        return false;
      };
    }
    call->requests.push_back(std::move(r));
  }
}

// Cuts `text` before the first stop sequence found at or after `from`.
inline void CutAtStop(const std::vector<std::string>& stops, size_t from, std::string* text) {
  size_t cut = std::string::npos;
  for (const std::string& s : stops) cut = std::min(cut, text->find(s, from));
  if (cut != std::string::npos) text->resize(cut);
}

// The generated text of `g`, cut before the first stop sequence it holds.
inline std::string GeneratedText(const GenerationResult& g, const std::vector<std::string>& stops,
                                 const Tokenizer& tok) {
  std::string out = tok.Decode(g.tokens);
  CutAtStop(stops, 0, &out);
  return out;
}

}  // namespace eellm::api
