// The OpenAI-style completions API: request fields and their defaults, every refused field named
// in an OpenAI-shaped error, the answer's shape, and the endpoints over HTTP.
#include "launch/openai_api.h"

#include <httplib.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/core/rng.h"
#include "gtest/gtest.h"
#include "launch/generation_service.h"
#include "models/bpe_tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/launch/served_model.h"
#include "tests/models/model_test_util.h"
#include "tests/models/tokenizer_json_fixtures.h"

namespace eellm {
namespace {

using nlohmann::json;

TEST(CompletionRequest, MapsFieldsAndOpenAiDefaults) {
  ByteTokenizer tok;
  auto call = ParseCompletionRequest(R"({"model": "x", "prompt": "ab"})", tok, ApiDefaults(), 0);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_EQ(call->requests.size(), 1u);
  const GenerationRequest& a = call->requests[0];
  EXPECT_EQ(a.prompt, (std::vector<int32_t>{'a', 'b'}));
  EXPECT_EQ(a.max_new_tokens, 16);
  EXPECT_FLOAT_EQ(a.sampling.temperature, 1.0f);
  EXPECT_FLOAT_EQ(a.sampling.top_p, 1.0f);
  EXPECT_FLOAT_EQ(a.early_exit.threshold, 1.0f);  // early exit off unless asked
  EXPECT_FALSE(a.speculative.enabled());          // so is speculative decoding
  EXPECT_FALSE(call->logprobs);
  EXPECT_FALSE(a.stop);
  // null means the default, as OpenAI clients send it.
  auto nulls = ParseCompletionRequest(R"({"prompt": "ab", "stream": null, "seed": null,
      "max_tokens": null, "temperature": null, "top_p": null, "stream_options": null})",
                                      tok, ApiDefaults(), 0);
  ASSERT_TRUE(nulls.ok()) << nulls.status();
  EXPECT_EQ(nulls->requests[0].max_new_tokens, 16);
  EXPECT_FALSE(nulls->stream);
  auto usage = ParseCompletionRequest(
      R"({"prompt": "ab", "stream": true, "stream_options": {"include_usage": true}})", tok,
      ApiDefaults(), 0);
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_TRUE(usage->stream_usage);
  EXPECT_FALSE(
      ParseCompletionRequest(R"({"prompt": "ab", "stream_options": {}})", tok, ApiDefaults(), 0)
          .ok());

  call = ParseCompletionRequest(R"({"prompt": ["ab", "c"], "max_tokens": 5, "temperature": 0,
      "top_p": 0.5, "top_k": -1, "seed": 42, "stop": "\n", "logprobs": 1, "n": 1,
      "stream": false, "echo": false, "presence_penalty": 0, "frequency_penalty": 0,
      "logit_bias": {}, "suffix": null, "user": "u", "best_of": 1,
      "early_exit_threshold": 0.7, "exit_layers": [2], "draft_exit_layer": 3, "draft_tokens": 2})",
                                tok, ApiDefaults(), 0);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_EQ(call->requests.size(), 2u);
  const GenerationRequest& b = call->requests[1];
  EXPECT_EQ(b.prompt, std::vector<int32_t>{'c'});
  EXPECT_EQ(b.max_new_tokens, 5);
  EXPECT_EQ(b.sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(b.sampling.top_p, 0.5f);
  EXPECT_EQ(b.sampling.top_k, 0);
  EXPECT_EQ(b.sampling.seed, 43u);
  EXPECT_FLOAT_EQ(b.early_exit.threshold, 0.7f);
  EXPECT_EQ(b.early_exit.exit_layers, std::vector<int>{2});
  EXPECT_EQ(b.speculative.exit_layer, 3);
  EXPECT_EQ(b.speculative.draft_tokens, 2);
  EXPECT_TRUE(call->logprobs);
  ASSERT_TRUE(b.stop);
  EXPECT_TRUE(b.stop({'x', '\n'}));
  EXPECT_EQ(call->stop_sequences, std::vector<std::string>{"\n"});
  EXPECT_FALSE(b.prompt_logprobs);
  EXPECT_EQ(b.top_logprobs, 1);

  // Scoring as lm-evaluation-harness asks: token-id prompts, echo, max_tokens 0, top logprobs.
  for (const char* prompt : {"[[104, 105], [33]]", "[104, 105]"}) {
    call = ParseCompletionRequest(absl::StrCat(R"({"prompt": )", prompt,
                                               R"(, "echo": true, "max_tokens": 0, "logprobs": 5,
        "temperature": 0})"),
                                  tok, ApiDefaults(), 0);
    ASSERT_TRUE(call.ok()) << call.status();
    EXPECT_EQ(call->prompts[0], "hi");
    EXPECT_EQ(call->requests[0].prompt, (std::vector<int32_t>{104, 105}));
    EXPECT_EQ(call->requests[0].max_new_tokens, 0);
    EXPECT_TRUE(call->requests[0].prompt_logprobs);
    EXPECT_EQ(call->requests[0].top_logprobs, 5);
    EXPECT_TRUE(call->echo);
  }
  EXPECT_EQ(call->requests.size(), 1u);
}

TEST(CompletionRequest, RefusedFieldsAreNamed) {
  ByteTokenizer tok;
  const std::pair<const char*, const char*> cases[] = {
      {R"({})", "\"prompt\" is required"},
      {R"({"prompt": []})", "a list of 1 to 128, got 0"},
      {R"({"prompt": "a", "n": 129})", "\"n\" must be an integer in [1, 128], got 129"},
      {R"({"prompt": ["a", "b"], "n": 65})", "2 prompts x \"n\" 65 = 130 completions"},
      {R"({"prompt": "a", "best_of": 3})", "\"best_of\" must be null, 1 or n"},
      {R"({"prompt": "a", "n": 2, "best_of": 3})", "\"best_of\" must be null, 1 or n"},
      {R"({"prompt": "a", "presence_penalty": 0.5})", "\"presence_penalty\" must be 0, got 0.5"},
      {R"({"prompt": "a", "logit_bias": {"1": 5}})", "\"logit_bias\" must be null"},
      {R"({"prompt": "a", "suffix": "z"})", "\"suffix\" must be null (not supported), got \"z\""},
      {R"({"prompt": "a", "logprobs": 21})",
       "\"logprobs\" must be null or an integer in [0, 20], got 21"},
      {R"({"prompt": "a", "max_tokens": 0, "echo": false})",
       "\"max_tokens\" must be an integer >= 1 (0 with echo: score the prompt), got 0"},
      {R"({"prompt": "a", "echo": true, "stream": true})", "\"echo\" is not supported with"},
      {R"({"prompt": [1, "a"]})", "\"prompt\" must be a list of strings, got [1,\"a\"]"},
      {R"({"prompt": [[1, 2], [-3]]})", "\"prompt\" must be a list of strings"},
      {R"({"prompt": "a", "max_tokens": 0})",
       "\"max_tokens\" must be an integer >= 1 (0 with echo"},
      {R"({"prompt": "a", "top_p": 0})", "\"top_p\" must be a number in (0, 1], got 0"},
      {R"({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]})", "at most 4 strings, got 5"},
      {R"({"prompt": "a", "early_exit_threshold": 2})", "\"early_exit_threshold\" must be"},
      {R"({"prompt": "a", "max_new_tokens": 3})", "unknown field \"max_new_tokens\""},
      {R"({"prompt": "a", "draft_tokens": 0})", "\"draft_tokens\" must be an integer in [1, 16]"},
  };
  for (const auto& [body, want] : cases) {
    auto r = ParseCompletionRequest(body, tok, ApiDefaults(), 0);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_NE(r.status().message().find(want), std::string::npos)
        << body << " -> " << r.status().message();
  }
  const json e = json::parse(CompletionError("bad \"n\"", true));
  EXPECT_EQ(e["error"]["message"], "bad \"n\"");
  EXPECT_EQ(e["error"]["type"], "invalid_request_error");
}

// n: each prompt n times in a row, sampling with successive seeds; the answer's choices in that
// order, and the usage counting each prompt once.
TEST(CompletionRequest, NSamplesEachPromptNTimes) {
  ByteTokenizer tok;
  auto call = ParseCompletionRequest(R"({"prompt": ["ab", "c"], "n": 2, "best_of": 2, "seed": 5,
      "temperature": 0.7})",
                                     tok, ApiDefaults(), 0);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_EQ(call->requests.size(), 4u);
  const std::vector<std::vector<int32_t>> prompts = {{'a', 'b'}, {'a', 'b'}, {'c'}, {'c'}};
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(call->requests[k].prompt, prompts[k]) << k;
    EXPECT_EQ(call->requests[k].sampling.seed, 5u + k) << k;
  }
  std::vector<GenerationResult> results(4);
  for (int k = 0; k < 4; ++k) {
    results[k].tokens = {static_cast<int32_t>('w' + k)};
    results[k].depth = {4};
  }
  const json r = json::parse(CompletionResponse(*call, results, tok, "m", 1, 0));
  ASSERT_EQ(r["choices"].size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(r["choices"][k]["index"], k);
    EXPECT_EQ(r["choices"][k]["text"], std::string(1, static_cast<char>('w' + k)));
  }
  EXPECT_EQ(r["usage"]["prompt_tokens"], 3);  // "ab" and "c", once each
  EXPECT_EQ(r["usage"]["completion_tokens"], 4);
}

// echo: the text and the logprobs start at the prompt (its first token unscored: null), with
// each position's most likely tokens and each token's character offset.
TEST(CompletionResponse, EchoScoresThePrompt) {
  ByteTokenizer tok;
  auto call = *ParseCompletionRequest(
      R"({"prompt": "Q:", "echo": true, "logprobs": 2, "max_tokens": 2})", tok, ApiDefaults(), 0);
  GenerationResult g;
  g.tokens = {' ', 'a'};
  g.depth = {4, 4};
  g.logprobs = {-1, -2};
  g.top = {{{' ', -1}, {'b', -1.5f}}, {{'c', -0.5f}, {'a', -2}}};
  g.prompt_logprobs = {-3};
  g.prompt_top = {{{'x', -0.5f}, {':', -3}}};
  const json r = json::parse(CompletionResponse(call, {g}, tok, "m", 1, 0));
  const json& c = r["choices"][0];
  EXPECT_EQ(c["text"], "Q: a");
  EXPECT_EQ(c["logprobs"]["tokens"], json({"Q", ":", " ", "a"}));
  EXPECT_EQ(c["logprobs"]["token_logprobs"], json({nullptr, -3.0, -1.0, -2.0}));
  EXPECT_EQ(c["logprobs"]["text_offset"], json({0, 1, 2, 3}));
  const json& top = c["logprobs"]["top_logprobs"];
  ASSERT_EQ(top.size(), 4u);
  EXPECT_TRUE(top[0].is_null());
  EXPECT_EQ(top[1], json({{"x", -0.5}, {":", -3.0}}));
  EXPECT_EQ(top[3], json({{"c", -0.5}, {"a", -2.0}}));
  EXPECT_EQ(r["usage"]["prompt_tokens"], 2);
}

// Checks TextOffsets(tok, ids) against each prefix decoded alone, its characters counted after
// invalid UTF-8 is replaced.
void ExpectPrefixCharacters(const Tokenizer& tok, const std::vector<int32_t>& ids,
                            const std::string& what) {
  const std::vector<size_t> got = TextOffsets(tok, ids);
  ASSERT_EQ(got.size(), ids.size());
  for (size_t k = 0; k < ids.size(); ++k) {
    const std::string prefix = tok.Decode(absl::MakeConstSpan(ids).first(k));
    const std::string safe =
        json::parse(json(prefix).dump(-1, ' ', false, json::error_handler_t::replace))
            .get<std::string>();
    size_t chars = 0;
    for (unsigned char ch : safe) chars += (ch & 0xC0) != 0x80;
    ASSERT_EQ(got[k], chars) << what << " token " << k;
  }
}

// A tokenizer that counts the ids it decodes (Decode and DecodeShares), around another.
class CountingTokenizer : public Tokenizer {
 public:
  explicit CountingTokenizer(const Tokenizer* inner) : inner_(inner) {}
  std::vector<int32_t> Encode(absl::string_view text) const override {
    return inner_->Encode(text);
  }
  std::string Decode(absl::Span<const int32_t> ids) const override {
    decoded_ += ids.size();
    return inner_->Decode(ids);
  }
  std::vector<std::string> DecodeShares(absl::Span<const int32_t> ids) const override {
    decoded_ += ids.size();
    return inner_->DecodeShares(ids);
  }
  std::string DecodeToken(int32_t id) const override { return inner_->DecodeToken(id); }
  int vocab_size() const override { return inner_->vocab_size(); }
  int eos_id() const override { return inner_->eos_id(); }
  int bos_id() const override { return inner_->bos_id(); }
  std::string name() const override { return inner_->name(); }
  mutable size_t decoded_ = 0;

 private:
  const Tokenizer* inner_;
};

// Text offsets in linear time (byte tokens: decoding joins their texts) equal each prefix's
// characters after invalid UTF-8 is replaced, for text mixing ASCII, 2-4 byte characters, bytes
// that are not UTF-8 alone, characters cut short, and special ids (no text).
TEST(CompletionResponse, TextOffsetsCountEachPrefixsCharacters) {
  ByteTokenizer tok;
  const std::vector<std::string> parts = {
      "a", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\x80", "\xFF", "\xE2\x82", "\xC3", " "};
  Rng rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<int32_t> ids;
    for (int k = 0; k < 40; ++k) {
      if (rng.Uniform() < 0.05) {
        ids.push_back(tok.eos_id());
        continue;
      }
      for (unsigned char ch : parts[static_cast<size_t>(rng.Uniform() * parts.size())]) {
        ids.push_back(ch);
      }
    }
    ExpectPrefixCharacters(tok, ids, "trial " + std::to_string(trial));
  }
}

// SentencePiece-style decoding drops the text's leading space, so one token decoded alone is not
// its share of the text; the offsets still come from each token's share in linear time and equal
// each prefix's characters: sequences that start with special ids, with a lone "▁" (its space is
// the one dropped, the next token's kept), with words, and byte-fallback bytes that join into
// 2-4 byte characters, or stay cut short.
TEST(CompletionResponse, TextOffsetsOfSentencePieceTokensInLinearTime) {
  auto sp = BpeTokenizer::FromJson(testing::SentencePieceJson().dump(), "sp");
  ASSERT_TRUE(sp.ok()) << sp.status();
  const Tokenizer& tok = **sp;
  auto bytes = [](std::initializer_list<int> b) {
    std::vector<int32_t> ids;
    for (int x : b) ids.push_back(3 + x);  // <0xXX>
    return ids;
  };
  const std::vector<std::vector<int32_t>> parts = {{1},
                                                   {2},
                                                   {259},
                                                   {271},
                                                   {272},
                                                   {260, 261},
                                                   {268, 263},
                                                   {266},
                                                   bytes({0xC3, 0xA9}),
                                                   bytes({0xE2, 0x82, 0xAC}),
                                                   bytes({0xF0, 0x9F, 0x98, 0x80}),
                                                   bytes({0x80}),
                                                   bytes({0xE2, 0x82}),
                                                   bytes({0x20})};
  Rng rng(11);
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<int32_t> ids;
    if (trial % 3 == 0) ids.push_back(1);    // <s> first
    if (trial % 5 == 1) ids.push_back(259);  // a lone "▁" first
    while (ids.size() < 40) {
      const auto& part = parts[static_cast<size_t>(rng.Uniform() * parts.size())];
      ids.insert(ids.end(), part.begin(), part.end());
    }
    // The shares join into the text.
    std::string joined;
    for (const std::string& s : tok.DecodeShares(ids)) joined += s;
    ASSERT_EQ(joined, tok.Decode(ids)) << "trial " << trial;
    ExpectPrefixCharacters(tok, ids, "trial " + std::to_string(trial));
  }
  // Linear: 4,000 tokens decode 8,000 ids (their shares, then the text), where decoding each
  // prefix would decode 8 million.
  std::vector<int32_t> ids;
  for (int k = 0; k < 2000; ++k) ids.insert(ids.end(), {271, 272});
  CountingTokenizer counting(&tok);
  const std::vector<size_t> offsets = TextOffsets(counting, ids);
  EXPECT_EQ(counting.decoded_, 2 * ids.size());
  EXPECT_EQ(offsets[1], 5u);                                    // "hello| w"
  EXPECT_EQ(offsets[2], 7u);                                    // "hello w| hello"
  EXPECT_EQ(offsets.back(), 7 + (ids.size() / 2 - 2) * 8 + 6);  // the last "▁w"
}

// A SentencePiece tokenizer joins the echoed prompt and the generated text as one decoding does
// ("hello" + "▁w..." is "hello world", not "helloworld"); offsets index that text in characters;
// top tokens whose texts coincide (bytes that are not UTF-8 alone) keep the likelier.
TEST(CompletionResponse, EchoDecodesPromptAndCompletionTogether) {
  auto tok = BpeTokenizer::FromJson(testing::SentencePieceJson().dump(), "sp");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto call = *ParseCompletionRequest(
      R"({"prompt": [271], "echo": true, "logprobs": 2, "max_tokens": 5, "stop": "ld"})", **tok,
      ApiDefaults(), 0);
  GenerationResult g;
  g.tokens = {272, 263, 265, 262, 266};  // ▁w o r l d
  g.depth = {4, 4, 4, 4, 4};
  g.logprobs = {-1, -1, -1, -1, -1};
  g.top = std::vector<TopTokens>(5, TopTokens{{131, -0.1f}, {132, -0.2f}});  // <0x80>, <0x81>
  g.prompt_logprobs = {};
  const json c = json::parse(CompletionResponse(call, {g}, **tok, "m", 1, 0))["choices"][0];
  EXPECT_EQ(c["text"], "hello wor");  // cut before the stop string, in the generated part
  EXPECT_EQ(c["logprobs"]["text_offset"], json({0, 5, 7, 8, 9, 10}));
  const json& top = c["logprobs"]["top_logprobs"][1];
  EXPECT_EQ(top.size(), 2u) << top.dump();
  EXPECT_FLOAT_EQ(top.at("\xEF\xBF\xBD").get<float>(), -0.1f);
  EXPECT_FLOAT_EQ(top.at(" w").get<float>(), -1);
}

TEST(CompletionResponse, HasOpenAiShapeAndEarlyExitLayers) {
  ByteTokenizer tok;
  auto call = *ParseCompletionRequest(R"({"prompt": ["Q:", "R"], "stop": "zz", "logprobs": 1})",
                                      tok, ApiDefaults(), 0);
  GenerationResult a, b;
  a.tokens = {' ', 'a', 'z', 'z'};
  a.depth = {1, 4, 4, 2};
  a.logprobs = {-0.5f, -1, -2, -3};
  a.finish = FinishReason::kStop;
  b.tokens = {'x', ByteTokenizer::kEosId};
  b.depth = {4, 4};
  b.logprobs = {-1, -2};
  b.finish = FinishReason::kEos;
  const json r = json::parse(CompletionResponse(call, {a, b}, tok, "m", 7, 1700000000));
  EXPECT_EQ(r["id"], "cmpl-7");
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["created"], 1700000000);
  EXPECT_EQ(r["model"], "m");
  ASSERT_EQ(r["choices"].size(), 2u);
  EXPECT_EQ(r["choices"][0]["text"], " a");  // no prompt, cut before the stop string
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r["choices"][1]["text"], "x");
  EXPECT_EQ(r["choices"][1]["finish_reason"], "stop");  // EOS
  EXPECT_EQ(r["choices"][1]["index"], 1);
  EXPECT_EQ(r["choices"][0]["layers"], json({1, 4, 4, 2}));
  EXPECT_EQ(r["choices"][0]["logprobs"]["token_logprobs"].size(), 4u);
  EXPECT_EQ(r["choices"][0]["logprobs"]["tokens"][1], "a");
  EXPECT_EQ(r["usage"]["prompt_tokens"], 3);
  EXPECT_EQ(r["usage"]["completion_tokens"], 6);
  EXPECT_EQ(r["usage"]["total_tokens"], 9);
  call.logprobs = false;
  EXPECT_TRUE(
      json::parse(CompletionResponse(call, {a, b}, tok, "m", 7, 0))["choices"][0]["logprobs"]
          .is_null());
}

// Streamed text: the events' text adds up to the answer's, a possible start of a stop string and
// a split UTF-8 character wait for the next token, and the last events carry finish reasons.
TEST(CompletionStreamTest, DeltasAddUpAndHoldBackStopStartsAndSplitCharacters) {
  ByteTokenizer tok;
  auto call = *ParseCompletionRequest(R"({"prompt": ["a", "b"], "stop": ["xyz"], "stream": true})",
                                      tok, ApiDefaults(), 3);
  EXPECT_TRUE(call.stream);
  CompletionStream stream(call, tok, "m", 3, 0);
  auto text_of = [](const std::string& event) -> std::string {
    if (event.empty()) return "";
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    EXPECT_EQ(event.substr(event.size() - 2), "\n\n");
    return json::parse(event.substr(6))["choices"][0]["text"];
  };
  EXPECT_EQ(text_of(stream.OnToken(0, 'h')), "h");
  EXPECT_EQ(text_of(stream.OnToken(0, 'x')), "");  // could start "xyz"
  EXPECT_EQ(text_of(stream.OnToken(0, 'y')), "");
  EXPECT_EQ(text_of(stream.OnToken(0, 'q')), "xyq");  // it did not
  EXPECT_EQ(text_of(stream.OnToken(1, 0xC3)), "");    // half of "é"
  EXPECT_EQ(text_of(stream.OnToken(1, 0xA9)), "\xC3\xA9");
  EXPECT_EQ(text_of(stream.OnToken(0, 'x')), "");
  GenerationResult a, b;
  a.tokens = {'h', 'x', 'y', 'q', 'x'};
  a.finish = FinishReason::kLength;
  b.tokens = {0xC3, 0xA9};
  b.finish = FinishReason::kEos;
  const std::string end = stream.Finish({a, b});
  const size_t second = end.find("data: ", 1), done = end.find("data: [DONE]\n\n");
  ASSERT_NE(second, std::string::npos);
  ASSERT_NE(done, std::string::npos);
  EXPECT_EQ(done + 14, end.size());
  const json e0 = json::parse(end.substr(6, second - 8));
  EXPECT_EQ(e0["choices"][0]["text"], "x");  // the held-back "x" was no stop after all
  EXPECT_EQ(e0["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(e0["id"], "cmpl-3");
  const json e1 = json::parse(end.substr(second + 6, done - second - 8));
  EXPECT_EQ(e1["choices"][0]["text"], "");
  EXPECT_EQ(e1["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(ParseCompletionRequest(R"({"prompt": "a", "stream": true, "logprobs": 1})", tok,
                                      ApiDefaults(), 0)
                   .ok());
}

// stream_options.include_usage: a last event without choices carries the usage.
TEST(CompletionStreamTest, UsageEventWhenAsked) {
  ByteTokenizer tok;
  auto call = *ParseCompletionRequest(
      R"({"prompt": "ab", "stream": true, "stream_options": {"include_usage": true}})", tok,
      ApiDefaults(), 0);
  CompletionStream stream(call, tok, "m", 0, 0);
  GenerationResult g;
  g.tokens = {'x', 'y', 'z'};
  const std::string end = stream.Finish({g});
  const size_t usage = end.find("\"usage\"");
  ASSERT_NE(usage, std::string::npos) << end;
  const size_t start = end.rfind("data: ", usage);
  const json u = json::parse(end.substr(start + 6, end.find("\n\n", start) - start - 6));
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["prompt_tokens"], 2);
  EXPECT_EQ(u["usage"]["completion_tokens"], 3);
  EXPECT_EQ(end.substr(end.size() - 14), "data: [DONE]\n\n");
}

// A streaming client that goes away after its first event cancels the rest of its request:
// the server counts it cancelled, long before its tokens would have run out.
TEST(CompletionServer, ClientThatGoesAwayCancels) {
  testing::ServedModel served(2, 4096);
  testing::LocalServer server(served);
  ASSERT_NE(server.port, 0);
  {
    httplib::Client client("127.0.0.1", server.port);
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = R"({"prompt": "a", "max_tokens": 4000, "temperature": 1, "stream": true})";
    req.set_header("Content-Type", "application/json");
    int chunks = 0;
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 1; };
    httplib::Response res;
    httplib::Error error;
    client.send(req, res, error);  // ends when the receiver declines the first chunk
    EXPECT_EQ(chunks, 1);
  }
  json h;
  for (int i = 0; i < 200; ++i) {  // up to 10 s
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    httplib::Client client("127.0.0.1", server.port);
    auto r = client.Get("/health");
    ASSERT_TRUE(r);
    h = json::parse(r->body);
    if (h["served"]["cancelled"] == 1) break;
  }
  EXPECT_EQ(h["served"]["cancelled"], 1) << h.dump();
  EXPECT_EQ(h["served"]["sequences"], 0) << h.dump();
  EXPECT_LT(h["served"]["tokens"].get<int>(), 3000) << h.dump();
}

// POST /v1/completions and GET /v1/models on a local port; the completion is what the generator
// gives alone.
TEST(CompletionServer, AnswersOverHttp) {
  testing::ServedModel served(4);
  Generator alone(served.model.get(), 64, 2);
  ApiDefaults defaults;
  defaults.model_name = "tiny";
  testing::LocalServer server(served, defaults);
  ASSERT_NE(server.port, 0);
  httplib::Client client("127.0.0.1", server.port);
  const std::string body = R"({"model": "tiny", "prompt": ["In the", "Lord"], "max_tokens": 8,
      "temperature": 0, "early_exit_threshold": 0.3})";
  auto res = client.Post("/v1/completions", body, "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200) << res->body;
  const json r = json::parse(res->body);
  auto call = *ParseCompletionRequest(body, served.tok, defaults, 0);
  auto want = *alone.GenerateBatch(call.requests);
  for (int i = 0; i < 2; ++i) {
    const json text = served.tok.Decode(want[i].tokens);
    EXPECT_EQ(r["choices"][i]["text"],
              json::parse(text.dump(-1, ' ', false, json::error_handler_t::replace)));
    EXPECT_EQ(r["choices"][i]["layers"], json(want[i].depth));
  }
  EXPECT_EQ(r["model"], "tiny");
  // Scoring a prompt given as token ids: the final head's log-probabilities, as the generator's.
  const std::string score =
      R"({"prompt": [73, 110, 32, 116, 104, 101], "echo": true, "max_tokens": 0, "logprobs": 1})";
  res = client.Post("/v1/completions", score, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  const json scored = json::parse(res->body)["choices"][0];
  EXPECT_EQ(scored["text"], "In the");
  const auto scored_want =
      *alone.GenerateBatch(ParseCompletionRequest(score, served.tok, defaults, 0)->requests);
  ASSERT_EQ(scored["logprobs"]["token_logprobs"].size(), 6u);
  EXPECT_TRUE(scored["logprobs"]["token_logprobs"][0].is_null());
  for (int p = 1; p < 6; ++p) {
    EXPECT_FLOAT_EQ(scored["logprobs"]["token_logprobs"][p].get<float>(),
                    scored_want[0].prompt_logprobs.at(p - 1));
    // The most likely token, and the prompt's own (OpenAI lists both).
    const json& top = scored["logprobs"]["top_logprobs"][p];
    const std::string own = scored["logprobs"]["tokens"][p];
    EXPECT_EQ(top.size(), top.contains(own) && top.size() == 1 ? 1u : 2u) << top.dump();
    EXPECT_FLOAT_EQ(top.at(own).get<float>(), scored_want[0].prompt_logprobs.at(p - 1));
  }
  res = client.Post("/v1/completions", R"({"prompt": "a", "n": 300})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(json::parse(res->body)["error"]["type"], "invalid_request_error") << res->body;
  // Streamed: the events' text adds up to the same completions, each ends with a finish reason.
  const std::string streamed = R"({"prompt": ["In the", "Lord"], "max_tokens": 8,
      "temperature": 0, "early_exit_threshold": 0.3, "stream": true})";
  res = client.Post("/v1/completions", streamed, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  std::vector<std::string> texts(2), finish(2);
  size_t events = 0;
  for (size_t at = 0; (at = res->body.find("data: ", at)) != std::string::npos; ++at) {
    const size_t end = res->body.find("\n\n", at);
    const std::string data = res->body.substr(at + 6, end - at - 6);
    if (data == "[DONE]") break;
    const json e = json::parse(data);
    const int i = e["choices"][0]["index"];
    texts[i] += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) finish[i] = e["choices"][0]["finish_reason"];
    ++events;
  }
  EXPECT_NE(res->body.find("data: [DONE]\n\n"), std::string::npos);
  EXPECT_GT(events, 4u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(json(texts[i]), r["choices"][i]["text"]) << "choice " << i;
    EXPECT_EQ(finish[i], "length");
  }
  res = client.Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["data"][0]["id"], "tiny") << res->body;
}

// "n" copies of a prompt: the first copy's pass computes its whole pages, which the other holds
// (2 pages of its 45 tokens: /health counts them) instead of prefilling them again; with greedy
// decoding both completions are the same.
TEST(CompletionServer, CopiesOfAPromptShareItsPrefill) {
  testing::ServedModel served(2, 64, /*kv_tokens=*/256);
  testing::LocalServer server(served);
  ASSERT_NE(server.port, 0);
  httplib::Client client("127.0.0.1", server.port);
  const std::string body = R"({"prompt": "In the beginning God created the heaven and the.",
      "max_tokens": 6, "temperature": 0, "n": 2})";
  auto res = client.Post("/v1/completions", body, "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json r = json::parse(res->body);
  ASSERT_EQ(r["choices"].size(), 2u) << res->body;
  EXPECT_EQ(r["choices"][0]["text"], r["choices"][1]["text"]);
  // (usage counts the prompt once, as its first copy computed it)
  EXPECT_EQ(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0) << res->body;
  res = client.Get("/health");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["served"]["prefix_cached_tokens"], 32) << res->body;
}

// A prompt sent again holds the K/V pages its first time computed: usage reports its whole pages
// (2 of 16 tokens of its 45) as cached_tokens, /metrics and /health count them, and the answer is
// the same.
TEST(CompletionServer, UsageCountsPromptTokensFromThePrefixCache) {
  testing::ServedModel served(2, 64, /*kv_tokens=*/256);
  testing::LocalServer server(served);
  ASSERT_NE(server.port, 0);
  httplib::Client client("127.0.0.1", server.port);
  const std::string prompt = "In the beginning God created the heaven and ";
  const std::string body = absl::StrCat(R"({"prompt": ")", prompt, R"(.", "max_tokens": 8,
      "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})");
  ASSERT_EQ(prompt.size() + 1, 45u);
  std::vector<json> usage;
  std::vector<std::string> texts;
  for (int i = 0; i < 2; ++i) {
    auto res = client.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    std::string text;
    for (size_t at = 0; (at = res->body.find("data: ", at)) != std::string::npos; ++at) {
      const size_t end = res->body.find("\n\n", at);
      const std::string data = res->body.substr(at + 6, end - at - 6);
      if (data == "[DONE]") break;
      const json e = json::parse(data);
      if (e.contains("usage")) usage.push_back(e["usage"]);
      if (!e["choices"].empty()) text += e["choices"][0]["text"].get<std::string>();
    }
    texts.push_back(text);
  }
  ASSERT_EQ(usage.size(), 2u);
  EXPECT_EQ(usage[0]["prompt_tokens"], 45);
  EXPECT_EQ(usage[0]["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_EQ(usage[1]["prompt_tokens_details"]["cached_tokens"], 32);
  EXPECT_EQ(texts[0], texts[1]);
  EXPECT_FALSE(texts[0].empty());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("\neellm_prefix_cache_hit_tokens_total 32\n"), std::string::npos)
      << res->body;
  res = client.Get("/health");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["served"]["prefix_cached_tokens"], 32) << res->body;
  // Without streaming, the same usage.
  const std::string plain = absl::StrCat(R"({"prompt": ")", prompt, R"(.", "max_tokens": 8})");
  res = client.Post("/v1/completions", plain, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
}

}  // namespace
}  // namespace eellm
