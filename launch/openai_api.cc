#include "launch/openai_api.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "launch/api_fields.h"
#include "launch/chat_template.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using api::Bad;
using api::Read;
using nlohmann::json;

const std::set<std::string>& KnownFields() {
  static const std::set<std::string> known = {"model",
                                              "prompt",
                                              "max_tokens",
                                              "temperature",
                                              "top_p",
                                              "n",
                                              "best_of",
                                              "stream",
                                              "stream_options",
                                              "logprobs",
                                              "echo",
                                              "stop",
                                              "seed",
                                              "user",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "logit_bias",
                                              "suffix",
                                              "top_k",
                                              "early_exit_threshold",
                                              "exit_layers",
                                              "draft_exit_layer",
                                              "draft_tokens",
                                              "draft_confidence"};
  return known;
}

// A string, or a list of strings, into *out.
absl::Status ReadStringOrList(const json& body, const char* field, std::vector<std::string>* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    out->push_back(it->get<std::string>());
    return absl::OkStatus();
  }
  return api::ReadStrings(body, field, out);
}

bool IsTokenList(const json& v) {
  if (!v.is_array() || v.empty()) return false;
  for (const json& t : v) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
      return false;
    }
  }
  return true;
}

// "prompt" as token ids, as OpenAI takes them: a list of ids, or a list of such lists. Their
// text goes to *text. Not token ids: false.
bool ReadTokenPrompts(const json& body, const Tokenizer& tok, std::vector<std::string>* text,
                      std::vector<std::vector<int32_t>>* ids) {
  const json& p = body["prompt"];
  std::vector<const json*> lists;
  if (IsTokenList(p)) {
    lists.push_back(&p);
  } else if (p.is_array() && !p.empty()) {
    for (const json& e : p) {
      if (!IsTokenList(e)) return false;
      lists.push_back(&e);
    }
  } else {
    return false;
  }
  for (const json* l : lists) {
    ids->push_back(l->get<std::vector<int32_t>>());
    text->push_back(tok.Decode(ids->back()));
  }
  return true;
}

// Fields accepted only at their neutral value.
absl::Status RequireNeutral(const json& body) {
  struct Neutral {
    const char* field;
    json value;
    const char* what;
  };
  const Neutral neutral[] = {{"presence_penalty", 0, "0"}, {"frequency_penalty", 0, "0"}};
  for (const Neutral& n : neutral) {
    auto it = body.find(n.field);
    if (it != body.end() && !it->is_null() && *it != n.value) return Bad(n.field, n.what, *it);
  }
  // best_of as n (the completions are n samples, none is dropped).
  if (auto it = body.find("best_of");
      it != body.end() && !it->is_null() && *it != 1 && *it != body.value("n", json(1))) {
    return Bad("best_of", "null, 1 or n (no completion is chosen among more)", *it);
  }
  for (const char* field : {"suffix", "logit_bias"}) {
    auto it = body.find(field);
    if (it != body.end() && !it->is_null() && !(it->is_object() && it->empty())) {
      return Bad(field, "null (not supported)", *it);
    }
  }
  return absl::OkStatus();
}

// The fields both APIs read alike: sampling, seed, streaming, early exit, speculative decoding
// and stop strings.
absl::Status ReadSharedFields(const json& body, const ApiDefaults& defaults,
                              uint64_t request_number, ApiCall* call, api::GenerationOptions* o) {
  int64_t seed =
      static_cast<int64_t>((defaults.seed + 1000003ull * request_number) & 0x1fffffffffffffull);
  RETURN_IF_ERROR(Read(body, "temperature", "a number in [0, 1e30] (0 = greedy)", &o->temperature,
                       [](double v) { return v >= 0 && v <= 1e30; }));
  RETURN_IF_ERROR(Read(body, "top_p", "a number in (0, 1]", &o->top_p,
                       [](double v) { return v > 0 && v <= 1; }));
  RETURN_IF_ERROR(Read(body, "top_k", "an integer >= -1 (-1 or 0 = all)", &o->top_k,
                       [](int v) { return v >= -1; }));
  o->top_k = std::max(o->top_k, 0);
  RETURN_IF_ERROR(Read(body, "seed", "an integer >= 0", &seed, [](int64_t v) { return v >= 0; }));
  o->seed = static_cast<uint64_t>(seed);
  RETURN_IF_ERROR(Read(body, "n", "an integer in [1, 128]", &call->n,
                       [](int v) { return v >= 1 && v <= 128; }));
  RETURN_IF_ERROR(Read(body, "stream", "true or false", &call->stream, [](bool) { return true; }));
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || !call->stream) {
      return Bad("stream_options", "null, or an object with \"stream\": true", *it);
    }
    for (const auto& [key, value] : it->items()) {
      if (key != "include_usage") {
        return absl::InvalidArgumentError(absl::StrCat(
            "unknown field \"", key, "\" in \"stream_options\" (known: include_usage)"));
      }
    }
    RETURN_IF_ERROR(Read(*it, "include_usage", "true or false", &call->stream_usage,
                         [](bool) { return true; }));
  }
  o->threshold = 1.0;
  RETURN_IF_ERROR(Read(body, "early_exit_threshold", "a number in (0, 1] (1 = off)", &o->threshold,
                       [](double v) { return v > 0 && v <= 1; }));
  RETURN_IF_ERROR(api::ReadLayers(body, "exit_layers", &o->exit_layers));
  RETURN_IF_ERROR(api::ReadSpeculative(body, &o->speculative));
  RETURN_IF_ERROR(ReadStringOrList(body, "stop", &call->stop_sequences));
  for (const std::string& s : call->stop_sequences) {
    if (s.empty()) return absl::InvalidArgumentError("\"stop\" may not hold \"\"");
  }
  if (call->stop_sequences.size() > 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"stop\" may hold at most 4 strings, got ", call->stop_sequences.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ApiCall> ParseCompletionRequest(const std::string& body_text, const Tokenizer& tok,
                                               const ApiDefaults& defaults,
                                               uint64_t request_number) {
  ASSIGN_OR_RETURN(const json body, api::ParseJsonBody(body_text, KnownFields()));
  RETURN_IF_ERROR(RequireNeutral(body));
  ApiCall call;
  if (!body.contains("prompt")) return absl::InvalidArgumentError("\"prompt\" is required");
  std::vector<std::vector<int32_t>> token_prompts;
  if (!ReadTokenPrompts(body, tok, &call.prompts, &token_prompts)) {
    RETURN_IF_ERROR(ReadStringOrList(body, "prompt", &call.prompts));
  }
  const int n = static_cast<int>(call.prompts.size());
  if (n < 1 || n > defaults.max_prompts) {
    return absl::InvalidArgumentError(absl::StrCat("\"prompt\" must be a string or a list of 1 to ",
                                                   defaults.max_prompts, ", got ", n));
  }
  api::GenerationOptions o;
  o.max_new_tokens = 16;  // OpenAI's default
  int logprobs = 0;
  RETURN_IF_ERROR(Read(body, "echo", "true or false", &call.echo, [](bool) { return true; }));
  RETURN_IF_ERROR(Read(body, "max_tokens", "an integer >= 1 (0 with echo: score the prompt)",
                       &o.max_new_tokens, [&](int v) { return v >= (call.echo ? 0 : 1); }));
  RETURN_IF_ERROR(ReadSharedFields(body, defaults, request_number, &call, &o));
  if (n * call.n > defaults.max_prompts) {
    return absl::InvalidArgumentError(absl::StrCat(n, " prompts x \"n\" ", call.n, " = ",
                                                   n * call.n, " completions, more than ",
                                                   defaults.max_prompts, " per request"));
  }
  if (body.contains("logprobs") && !body["logprobs"].is_null()) {
    RETURN_IF_ERROR(Read(body, "logprobs", "null or an integer in [0, 20]", &logprobs,
                         [](int v) { return v >= 0 && v <= kMaxTopLogprobs; }));
  }
  call.logprobs = body.contains("logprobs") && !body["logprobs"].is_null();
  call.top_logprobs = logprobs;
  o.top_logprobs = logprobs;
  // max_tokens 0 with echo answers the prompt alone: it is scored even when not asked.
  o.prompt_logprobs = call.echo && (call.logprobs || o.max_new_tokens == 0);
  if (call.stream && logprobs > 0) {
    return absl::InvalidArgumentError("\"logprobs\" is not supported with \"stream\"");
  }
  if (call.stream) call.logprobs = false;  // logprobs 0 while streaming: none
  if (call.stream && call.echo) {
    return absl::InvalidArgumentError("\"echo\" is not supported with \"stream\"");
  }
  api::AddGenerationRequests(o, tok, &call, token_prompts);
  return call;
}

namespace {

const std::set<std::string>& KnownChatFields() {
  static const std::set<std::string> known = {"model",
                                              "messages",
                                              "max_tokens",
                                              "max_completion_tokens",
                                              "temperature",
                                              "top_p",
                                              "top_k",
                                              "n",
                                              "stream",
                                              "stream_options",
                                              "stop",
                                              "seed",
                                              "user",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "logit_bias",
                                              "logprobs",
                                              "top_logprobs",
                                              "tools",
                                              "tool_choice",
                                              "response_format",
                                              "parallel_tool_calls",
                                              "early_exit_threshold",
                                              "exit_layers",
                                              "draft_exit_layer",
                                              "draft_tokens",
                                              "draft_confidence"};
  return known;
}

// "messages": [{"role", "content": a string or a list of {"type": "text", "text"} parts}, ...].
absl::StatusOr<std::vector<ChatMessage>> ReadMessages(const json& body) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return Bad("messages", "a list of 1 or more messages", it == body.end() ? json(nullptr) : *it);
  }
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return Bad(at, "an object with \"role\" and \"content\"", m);
    for (const auto& [key, value] : m.items()) {
      if (key != "role" && key != "content" && key != "name") {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown field \"", key, "\" in ", at, " (known: role, content, name)"));
      }
    }
    ChatMessage msg;
    if (!m.contains("role") || !m["role"].is_string()) {
      return Bad(at + ".role", "system, user or assistant", m.value("role", json(nullptr)));
    }
    msg.role = m["role"].get<std::string>();
    if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for it
    const json content = m.value("content", json(nullptr));
    if (content.is_string()) {
      msg.content = content.get<std::string>();
    } else if (content.is_null() && msg.role == "assistant") {
      // an earlier assistant turn without text (OpenAI allows it)
    } else if (content.is_array()) {
      for (size_t k = 0; k < content.size(); ++k) {
        const json& part = content[k];
        auto type = part.is_object() ? part.find("type") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad(at + ".content", "a string or a list of {\"type\": \"text\", \"text\"} parts",
                     content);
        }
        if (k > 0) msg.content += "\n";  // as vLLM joins text parts
        msg.content += part["text"].get<std::string>();
      }
    } else {
      return Bad(at + ".content", "a string or a list of text parts", content);
    }
    messages.push_back(std::move(msg));
  }
  return messages;
}

// Chat fields accepted only at their neutral value.
absl::Status RequireNeutralChat(const json& body) {
  auto neutral = [&](const char* field, const json& ok, const char* what) -> absl::Status {
    auto it = body.find(field);
    if (it != body.end() && !it->is_null() && *it != ok) return Bad(field, what, *it);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(neutral("logprobs", false, "false (not supported in chat)"));
  RETURN_IF_ERROR(neutral("top_logprobs", 0, "0 (not supported in chat)"));
  RETURN_IF_ERROR(neutral("tools", json::array(), "[] (tool calls are not supported)"));
  if (auto it = body.find("tool_choice");
      it != body.end() && !it->is_null() && *it != "none" && *it != "auto") {
    return Bad("tool_choice", "\"none\" or \"auto\" (tool calls are not supported)", *it);
  }
  RETURN_IF_ERROR(neutral("parallel_tool_calls", false, "false"));
  return neutral("response_format", json{{"type", "text"}}, "{\"type\": \"text\"}");
}

// The prompt of body["messages"] in defaults.chat_template's format (resolved into *format).
absl::StatusOr<std::string> ChatPrompt(const json& body, const Tokenizer& tok,
                                       const ApiDefaults& defaults, ChatFormat* format) {
  ASSIGN_OR_RETURN(const std::vector<ChatMessage> messages, ReadMessages(body));
  ASSIGN_OR_RETURN(*format, ResolveChatFormat(defaults.chat_template, tok));
  return RenderChat(*format, messages);
}

}  // namespace

absl::StatusOr<ApiCall> ParseChatRequest(const std::string& body_text, const Tokenizer& tok,
                                         const ApiDefaults& defaults, uint64_t request_number) {
  ASSIGN_OR_RETURN(const json body, api::ParseJsonBody(body_text, KnownChatFields()));
  RETURN_IF_ERROR(RequireNeutral(body));
  RETURN_IF_ERROR(RequireNeutralChat(body));
  ChatFormat format;
  ASSIGN_OR_RETURN(std::string prompt, ChatPrompt(body, tok, defaults, &format));
  ApiCall call;
  call.chat = true;
  call.prompts = {std::move(prompt)};
  api::GenerationOptions o;
  o.max_new_tokens = 256;
  bool asked = false;
  for (const char* field : {"max_tokens", "max_completion_tokens"}) {
    asked |= body.contains(field) && !body[field].is_null();
    RETURN_IF_ERROR(
        Read(body, field, "an integer >= 1", &o.max_new_tokens, [](int v) { return v >= 1; }));
  }
  RETURN_IF_ERROR(ReadSharedFields(body, defaults, request_number, &call, &o));
  if (call.n > defaults.max_prompts) {
    return Bad("n", absl::StrCat("at most ", defaults.max_prompts), body["n"]);
  }
  for (const std::string& s : EndOfTurnStrings(format)) call.stop_sequences.push_back(s);
  api::AddGenerationRequests(o, tok, &call);
  // The reply ends at the format's end-of-turn token as at EOS.
  const std::vector<int32_t> ends = EndOfTurnIds(format, tok);
  for (GenerationRequest& r : call.requests) {
    // Unless asked: 256 tokens, or what the context leaves after the prompt when that is less.
    const int left = defaults.context - static_cast<int>(r.prompt.size());
    if (!asked && defaults.context > 0 && left >= 1) {
      r.max_new_tokens = std::min(r.max_new_tokens, left);
    }
    if (ends.empty()) continue;
    r.stop = [ends, text_stop = std::move(r.stop)](const std::vector<int32_t>& generated) {
      if (!generated.empty() &&
          std::find(ends.begin(), ends.end(), generated.back()) != ends.end()) {
        return true;
      }
      return text_stop && text_stop(generated);
    };
  }
  return call;
}

namespace {

// `s` with invalid UTF-8 replaced by U+FFFD, as the JSON answer carries it.
std::string Utf8Safe(const std::string& s) {
  return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace))
      .get<std::string>();
}

// Characters (code points) of valid UTF-8, as OpenAI counts text offsets.
size_t Characters(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

std::vector<size_t> TextOffsets(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  const size_t n = ids.size();
  std::vector<size_t> offsets(n);
  const std::vector<std::string> pieces = tok.DecodeShares(ids);
  std::string joined;
  for (const std::string& p : pieces) joined += p;
  if (pieces.size() != n || joined != tok.Decode(ids)) {  // a tokenizer without shares
    for (size_t k = 0; k < n; ++k) {
      offsets[k] = Characters(Utf8Safe(tok.Decode(absl::MakeConstSpan(ids).first(k))));
    }
    return offsets;
  }
  // The characters of the text up to the last point where it is valid UTF-8, and the bytes after
  // it (and their replaced form): replacing invalid UTF-8 restarts there, so the prefix counts
  // stay exact.
  size_t chars = 0;
  std::string tail, safe_tail;
  for (size_t k = 0; k < n; ++k) {
    offsets[k] = chars + Characters(safe_tail);
    tail += pieces[k];
    safe_tail = Utf8Safe(tail);
    if (safe_tail == tail) {
      chars += Characters(tail);
      tail.clear();
      safe_tail.clear();
    }
  }
  return offsets;
}

namespace {

// The echoed prompt's ids (when echo), then the generated ones.
std::vector<int32_t> ChoiceIds(const ApiCall& call, size_t i, const GenerationResult& g) {
  std::vector<int32_t> ids;
  if (call.echo) ids = call.requests[i].prompt;
  ids.insert(ids.end(), g.tokens.begin(), g.tokens.end());
  return ids;
}

// A choice's text: with echo the prompt's and the generated tokens decoded together (a tokenizer
// may join them otherwise than their two texts), cut before a stop string in the generated part.
std::string ChoiceText(const ApiCall& call, size_t i, const GenerationResult& g,
                       const Tokenizer& tok) {
  if (!call.echo) return api::GeneratedText(g, call.stop_sequences, tok);
  const std::string prompt = tok.Decode(call.requests[i].prompt);
  std::string all = tok.Decode(ChoiceIds(call, i, g));
  if (all.compare(0, prompt.size(), prompt) != 0) {
    return prompt + api::GeneratedText(g, call.stop_sequences, tok);
  }
  api::CutAtStop(call.stop_sequences, prompt.size(), &all);
  return all;
}

// OpenAI's "logprobs" object of one choice, per token (with echo the prompt's first, the first
// of them without a log-probability: null): its text, log-probability, the most likely tokens
// and itself ({text: log-probability}, the likelier kept where texts coincide), and where its
// text starts in the choice's text, in characters.
json ChoiceLogprobs(const ApiCall& call, size_t i, const GenerationResult& g,
                    const Tokenizer& tok) {
  json tokens = json::array(), values = json::array(), tops = json::array(),
       offsets = json::array();
  const std::vector<int32_t> ids = ChoiceIds(call, i, g);
  const std::vector<size_t> text_offsets = TextOffsets(tok, ids);
  auto add = [&](size_t k, json value, const TopTokens* top) {
    tokens.push_back(Utf8Safe(tok.DecodeToken(ids[k])));
    offsets.push_back(text_offsets[k]);
    json entry = nullptr;
    if (top != nullptr) {
      entry = json::object();
      for (const auto& [id, lp] : *top) entry.emplace(Utf8Safe(tok.DecodeToken(id)), lp);
      entry.emplace(tokens.back().get<std::string>(), value);
    }
    tops.push_back(std::move(entry));
    values.push_back(std::move(value));
  };
  size_t k = 0;
  if (call.echo) {
    for (size_t p = 0; p < call.requests[i].prompt.size(); ++p, ++k) {
      const bool scored = p > 0 && p - 1 < g.prompt_logprobs.size();
      add(k, scored ? json(g.prompt_logprobs[p - 1]) : json(nullptr),
          scored && p - 1 < g.prompt_top.size() ? &g.prompt_top[p - 1] : nullptr);
    }
  }
  for (size_t t = 0; t < g.tokens.size(); ++t, ++k) {
    add(k, g.logprobs[t], t < g.top.size() ? &g.top[t] : nullptr);
  }
  return {{"tokens", tokens},
          {"token_logprobs", values},
          {"top_logprobs", tops},
          {"text_offset", offsets}};
}

// OpenAI's usage object (a prompt counted once however many choices it has);
// prompt_tokens_details.cached_tokens: prompt tokens whose K/V came from the prefix cache (for
// each prompt's first choice).
json Usage(const ApiCall& call, const std::vector<GenerationResult>& results) {
  size_t prompt = 0, completion = 0, cached = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    if (i % call.n == 0) {
      prompt += call.requests[i].prompt.size();
      cached += results[i].cached_prompt_tokens;
    }
    completion += results[i].tokens.size();
  }
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

}  // namespace

std::string CompletionResponse(const ApiCall& call, const std::vector<GenerationResult>& results,
                               const Tokenizer& tok, const std::string& model,
                               uint64_t request_number, int64_t created) {
  json choices = json::array();
  for (size_t i = 0; i < results.size(); ++i) {
    const GenerationResult& g = results[i];
    const json logprobs = call.logprobs ? ChoiceLogprobs(call, i, g, tok) : json(nullptr);
    json choice = {{"index", i},
                   {"logprobs", logprobs},
                   {"finish_reason", g.finish == FinishReason::kLength ? "length" : "stop"},
                   {"layers", g.depth}};
    if (call.chat) {
      choice["message"] = {{"role", "assistant"}, {"content", ChoiceText(call, i, g, tok)}};
    } else {
      choice["text"] = ChoiceText(call, i, g, tok);
    }
    choices.push_back(std::move(choice));
  }
  const json r = {{"id", absl::StrCat(call.chat ? "chatcmpl-" : "cmpl-", request_number)},
                  {"object", call.chat ? "chat.completion" : "text_completion"},
                  {"created", created},
                  {"model", model},
                  {"choices", choices},
                  {"usage", Usage(call, results)}};
  return r.dump(-1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<std::string> TokenizeAnswer(const std::string& body_text, const Tokenizer& tok,
                                           const ApiDefaults& defaults) {
  ASSIGN_OR_RETURN(const json body,
                   api::ParseJsonBody(body_text, {"model", "prompt", "messages",
                                                  "add_special_tokens", "add_generation_prompt"}));
  bool special = false, generation_prompt = true;
  RETURN_IF_ERROR(
      Read(body, "add_special_tokens", "true or false", &special, [](bool) { return true; }));
  RETURN_IF_ERROR(Read(body, "add_generation_prompt", "true (the chat formats always add it)",
                       &generation_prompt, [](bool v) { return v; }));
  std::string text;
  if (body.contains("messages") == body.contains("prompt")) {
    return absl::InvalidArgumentError("give either \"prompt\" (a string) or \"messages\"");
  }
  if (body.contains("prompt")) {
    if (!body["prompt"].is_string()) return Bad("prompt", "a string", body["prompt"]);
    text = body["prompt"].get<std::string>();
  } else {
    ChatFormat format;
    ASSIGN_OR_RETURN(text, ChatPrompt(body, tok, defaults, &format));
  }
  std::vector<int32_t> ids = tok.Encode(text);
  if (special) ids.insert(ids.begin(), tok.bos_id());  // BOS, as vLLM adds it
  const json r = {{"count", ids.size()}, {"max_model_len", defaults.context}, {"tokens", ids}};
  return r.dump();
}

absl::StatusOr<std::string> DetokenizeAnswer(const std::string& body_text, const Tokenizer& tok) {
  ASSIGN_OR_RETURN(const json body, api::ParseJsonBody(body_text, {"model", "tokens"}));
  auto it = body.find("tokens");
  const bool ids =
      it != body.end() && it->is_array() && std::all_of(it->begin(), it->end(), [&](const json& t) {
        return t.is_number_integer() && t.get<int64_t>() >= 0 &&
               t.get<int64_t>() < tok.vocab_size();
      });
  if (!ids) {
    return Bad("tokens", absl::StrCat("a list of token ids in [0, ", tok.vocab_size(), ")"),
               it == body.end() ? json(nullptr) : *it);
  }
  const json r = {{"prompt", tok.Decode(it->get<std::vector<int32_t>>())}};
  return r.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string CompletionError(const std::string& message, bool bad_request) {
  const json r = {{"error",
                   {{"message", message},
                    {"type", bad_request ? "invalid_request_error" : "server_error"},
                    {"param", nullptr},
                    {"code", nullptr}}}};
  return r.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

// Bytes at the end of `s` that start a UTF-8 character not yet complete.
size_t IncompleteUtf8Tail(const std::string& s) {
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = (c & 0xE0) == 0xC0   ? 2
                        : (c & 0xF0) == 0xE0 ? 3
                        : (c & 0xF8) == 0xF0 ? 4
                                             : 1;
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

CompletionStream::CompletionStream(const ApiCall& call, const Tokenizer& tok, std::string model,
                                   uint64_t request_number, int64_t created)
    : call_(call),
      tok_(tok),
      model_(std::move(model)),
      id_(absl::StrCat(call.chat ? "chatcmpl-" : "cmpl-", request_number)),
      created_(created),
      tokens_(call.requests.size()),
      sent_(call.requests.size(), 0),
      role_sent_(call.requests.size(), false) {}

std::string CompletionStream::Event(int index, const std::string& text, const char* finish) {
  json choice = {{"index", index},
                 {"logprobs", nullptr},
                 {"finish_reason", finish == nullptr ? json(nullptr) : json(finish)}};
  if (call_.chat) {  // a delta of the assistant's message; the first names the role
    choice["delta"] = json::object();
    if (!role_sent_[index]) choice["delta"]["role"] = "assistant";
    if (!text.empty() || !role_sent_[index]) choice["delta"]["content"] = text;
    role_sent_[index] = true;
  } else {
    choice["text"] = text;
  }
  const json r = {{"id", id_},
                  {"object", call_.chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", created_},
                  {"model", model_},
                  {"choices", json::array({choice})}};
  return absl::StrCat("data: ", r.dump(-1, ' ', false, json::error_handler_t::replace), "\n\n");
}

std::string CompletionStream::OnToken(int index, int32_t token) {
  tokens_[index].push_back(token);
  std::string text = tok_.Decode(tokens_[index]);
  size_t end = text.size();
  for (const std::string& stop : call_.stop_sequences) {
    const size_t at = text.find(stop);
    if (at != std::string::npos) {
      end = std::min(end, at);
      continue;
    }
    // Hold back the longest end of the text that begins this stop string.
    for (size_t k = std::min(stop.size() - 1, text.size()); k > 0; --k) {
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) {
        end = std::min(end, text.size() - k);
        break;
      }
    }
  }
  text.resize(end);
  end -= IncompleteUtf8Tail(text);
  if (end <= sent_[index]) return "";
  const std::string delta = text.substr(sent_[index], end - sent_[index]);
  sent_[index] = end;
  return Event(index, delta, nullptr);
}

std::string CompletionStream::Finish(const std::vector<GenerationResult>& results) {
  std::string out;
  for (size_t i = 0; i < results.size(); ++i) {
    const std::string text = api::GeneratedText(results[i], call_.stop_sequences, tok_);
    const std::string rest = sent_[i] < text.size() ? text.substr(sent_[i]) : "";
    const char* finish = results[i].finish == FinishReason::kLength ? "length" : "stop";
    out += Event(static_cast<int>(i), rest, finish);
  }
  if (call_.stream_usage) {  // OpenAI's last chunk: no choices, the usage
    const json r = {{"id", id_},
                    {"object", call_.chat ? "chat.completion.chunk" : "text_completion"},
                    {"created", created_},
                    {"model", model_},
                    {"choices", json::array()},
                    {"usage", Usage(call_, results)}};
    out += absl::StrCat("data: ", r.dump(), "\n\n");
  }
  return out + "data: [DONE]\n\n";
}

}  // namespace eellm
