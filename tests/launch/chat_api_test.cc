// POST /v1/chat/completions: the chat formats rendered exactly, format detection from the
// tokenizer's markers, request fields and refusals named, the reply ending at the end-of-turn
// token, the answer's and the stream's chat shapes, and the endpoint over HTTP.
#include <httplib.h>

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "launch/api_fields.h"
#include "launch/chat_template.h"
#include "launch/openai_api.h"
#include "models/bpe_tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/launch/served_model.h"
#include "tests/models/tokenizer_json_fixtures.h"

namespace eellm {
namespace {

using nlohmann::json;

// The byte-level fixture with ChatML's markers as special tokens (ids 264, 265).
std::unique_ptr<BpeTokenizer> ChatMlTokenizer() {
  json j = testing::ByteLevelJson();
  j["added_tokens"].push_back({{"id", 264}, {"content", "<|im_start|>"}, {"special", true}});
  j["added_tokens"].push_back({{"id", 265}, {"content", "<|im_end|>"}, {"special", true}});
  auto tok = BpeTokenizer::FromJson(j.dump(), "chatml.json");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return std::move(*tok);
}

const std::vector<ChatMessage> kConversation = {
    {"system", "Be brief."}, {"user", " Hi "}, {"assistant", "Hello."}, {"user", "Why?"}};

TEST(ChatTemplate, RendersEachFormat) {
  EXPECT_EQ(*RenderChat(ChatFormat::kChatMl, kConversation),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
            "<|im_start|>assistant\n");
  // Llama 3 trims each message.
  EXPECT_EQ(*RenderChat(ChatFormat::kLlama3, kConversation),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(*RenderChat(ChatFormat::kPlain, kConversation),
            "system: Be brief.\nuser:  Hi \nassistant: Hello.\nuser: Why?\nassistant:");
  auto bad = RenderChat(ChatFormat::kChatMl, {{"user", "a"}, {"tool", "b"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("messages[1].role"), std::string::npos);
  EXPECT_NE(bad.status().message().find("\"tool\""), std::string::npos);
  EXPECT_FALSE(RenderChat(ChatFormat::kPlain, {}).ok());
}

TEST(ChatTemplate, AutoFindsTheTokenizersMarkers) {
  auto chatml = ChatMlTokenizer();
  EXPECT_EQ(*ResolveChatFormat("auto", *chatml), ChatFormat::kChatMl);
  EXPECT_EQ(EndOfTurnIds(ChatFormat::kChatMl, *chatml), std::vector<int32_t>{265});
  ByteTokenizer bytes;  // no markers: named formats only
  auto none = ResolveChatFormat("auto", bytes);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("--chat-template"), std::string::npos);
  EXPECT_EQ(*ResolveChatFormat("plain", bytes), ChatFormat::kPlain);
  EXPECT_EQ(*ResolveChatFormat("llama3", bytes), ChatFormat::kLlama3);
  EXPECT_TRUE(EndOfTurnIds(ChatFormat::kLlama3, bytes).empty());  // not single tokens here
  auto unknown = ResolveChatFormat("vicuna", bytes);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("\"vicuna\""), std::string::npos);
}

TEST(ChatRequest, RendersTheMessagesAndStopsAtTheEndOfTurn) {
  auto tok = ChatMlTokenizer();
  auto call = ParseChatRequest(R"({"model": "m", "messages": [
      {"role": "system", "content": "S"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null}, {"role": "developer", "content": "D"}],
      "temperature": 0, "seed": 3, "stop": ["x"], "tools": [], "tool_choice": "auto",
      "logprobs": false, "response_format": {"type": "text"}, "n": 1})",
                               *tok, ApiDefaults(), 0);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_TRUE(call->chat);
  ASSERT_EQ(call->prompts.size(), 1u);
  EXPECT_EQ(call->prompts[0],
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
            "<|im_start|>assistant\n<|im_end|>\n<|im_start|>system\nD<|im_end|>\n"
            "<|im_start|>assistant\n");
  const GenerationRequest& r = call->requests[0];
  EXPECT_EQ(r.prompt, tok->Encode(call->prompts[0]));
  EXPECT_EQ(r.prompt[0], 264);  // the marker is one token
  EXPECT_EQ(r.max_new_tokens, 256);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.0f);
  ASSERT_TRUE(r.stop);
  EXPECT_TRUE(r.stop({'o', 'k', 265}));   // <|im_end|>
  EXPECT_FALSE(r.stop({'o', 265, 'k'}));  // only as the last token
  EXPECT_TRUE(r.stop({'a', 'x'}));        // and at the request's stop strings
  // A tokenizer without the markers as tokens ends the reply at their text.
  ByteTokenizer bytes;
  ApiDefaults chatml;
  chatml.chat_template = "chatml";
  auto as_text =
      ParseChatRequest(R"({"messages": [{"role": "user", "content": "q"}]})", bytes, chatml, 0);
  ASSERT_TRUE(as_text.ok()) << as_text.status();
  const std::vector<int32_t> marker = bytes.Encode("ok<|im_end|>");
  EXPECT_TRUE(as_text->requests[0].stop(marker));
  GenerationResult g;
  g.tokens = marker;
  EXPECT_EQ(api::GeneratedText(g, as_text->stop_sequences, bytes), "ok");
  // Without max_tokens the reply fits what the context leaves after the prompt.
  chatml.context = 100;
  auto fitted =
      ParseChatRequest(R"({"messages": [{"role": "user", "content": "q"}]})", bytes, chatml, 0);
  ASSERT_TRUE(fitted.ok()) << fitted.status();
  EXPECT_EQ(fitted->requests[0].max_new_tokens,
            100 - static_cast<int>(fitted->requests[0].prompt.size()));
  auto limited = ParseChatRequest(
      R"({"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 7})", *tok,
      ApiDefaults(), 0);
  ASSERT_TRUE(limited.ok()) << limited.status();
  EXPECT_EQ(limited->requests[0].max_new_tokens, 7);
}

TEST(ChatRequest, RefusedFieldsAreNamed) {
  auto tok = ChatMlTokenizer();
  const std::pair<const char*, const char*> cases[] = {
      {R"({"messages": []})", "\"messages\""},
      {R"({"prompt": "a", "messages": [{"role": "user", "content": "a"}]})", "unknown field"},
      {R"({"messages": [{"role": "tool", "content": "a"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "user"}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": [{"type": 3, "text": "a"}]}]})",
       "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": null}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": "a", "tool_calls": []}]})", "tool_calls"},
      {R"({"messages": [{"role": "user", "content": "a"}], "n": 0})", "\"n\""},
      {R"({"messages": [{"role": "user", "content": "a"}], "logprobs": true})", "\"logprobs\""},
      {R"({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]})",
       "\"tools\""},
      {R"({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0})", "\"max_tokens\""},
      {R"({"messages": [{"role": "user", "content": "a"}], "temperature": -1})", "temperature"},
  };
  for (const auto& [body, want] : cases) {
    auto r = ParseChatRequest(body, *tok, ApiDefaults(), 0);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_NE(r.status().message().find(want), std::string::npos)
        << body << " -> " << r.status().message();
  }
  ByteTokenizer bytes;  // auto finds no format: the error names the flag
  auto none = ParseChatRequest(R"({"messages": [{"role": "user", "content": "a"}]})", bytes,
                               ApiDefaults(), 0);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("--chat-template"), std::string::npos);
}

TEST(ChatResponse, HasTheChatShapes) {
  auto tok = ChatMlTokenizer();
  auto call = *ParseChatRequest(
      R"({"messages": [{"role": "user", "content": "q"}], "stream": true,
          "stream_options": {"include_usage": true}})",
      *tok, ApiDefaults(), 7);
  GenerationResult g;
  g.tokens = {'o', 'k', 265};  // the end-of-turn token is special: not in the text
  g.depth = {4, 2, 4};
  g.finish = FinishReason::kStop;
  const json r = json::parse(CompletionResponse(call, {g}, *tok, "m", 7, 0));
  EXPECT_EQ(r["id"], "chatcmpl-7");
  EXPECT_EQ(r["object"], "chat.completion");
  const json& c = r["choices"][0];
  EXPECT_EQ(c["message"], json({{"role", "assistant"}, {"content", "ok"}}));
  EXPECT_FALSE(c.contains("text"));
  EXPECT_EQ(c["finish_reason"], "stop");
  EXPECT_EQ(c["layers"], json({4, 2, 4}));
  EXPECT_EQ(r["usage"]["completion_tokens"], 3);
  // Streamed: the first chunk names the role, the deltas add up to the content, the last chunk
  // has the finish reason, then the usage chunk and [DONE].
  CompletionStream stream(call, *tok, "m", 7, 0);
  std::string events;
  for (int32_t t : g.tokens) events += stream.OnToken(0, t);
  events += stream.Finish({g});
  std::string content;
  std::vector<json> chunks;
  for (size_t at = 0; (at = events.find("data: ", at)) != std::string::npos; ++at) {
    const std::string data = events.substr(at + 6, events.find("\n\n", at) - at - 6);
    if (data == "[DONE]") break;
    chunks.push_back(json::parse(data));
    EXPECT_EQ(chunks.back()["object"], "chat.completion.chunk");
    EXPECT_EQ(chunks.back()["id"], "chatcmpl-7");
  }
  ASSERT_GE(chunks.size(), 3u);
  EXPECT_EQ(chunks[0]["choices"][0]["delta"]["role"], "assistant");
  for (size_t k = 0; k + 1 < chunks.size(); ++k) {
    const json& delta = chunks[k]["choices"][0]["delta"];
    if (k > 0) EXPECT_FALSE(delta.contains("role"));
    if (delta.contains("content")) content += delta["content"].get<std::string>();
  }
  EXPECT_EQ(content, "ok");
  EXPECT_EQ(chunks[chunks.size() - 2]["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(chunks.back()["choices"].empty());
  EXPECT_EQ(chunks.back()["usage"]["completion_tokens"], 3);
  EXPECT_NE(events.find("data: [DONE]\n\n"), std::string::npos);
}

// Over HTTP with the byte-level model and the plain format: the reply is the completion of the
// rendered conversation, streamed or not.
TEST(ChatServer, AnswersTheRenderedConversation) {
  testing::ServedModel served(2);
  Generator alone(served.model.get(), 64, 1);
  ApiDefaults defaults;
  defaults.chat_template = "plain";
  testing::LocalServer server(served, defaults);
  ASSERT_NE(server.port, 0);
  httplib::Client client("127.0.0.1", server.port);
  const std::string body = R"({"messages": [{"role": "user", "content": "In the"}],
      "max_tokens": 8, "temperature": 0})";
  auto res = client.Post("/v1/chat/completions", body, "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  ASSERT_EQ(res->status, 200) << res->body;
  const json r = json::parse(res->body);
  auto want = *alone.GenerateBatch(ParseChatRequest(body, served.tok, defaults, 0)->requests);
  EXPECT_EQ(served.tok.Decode(ParseChatRequest(body, served.tok, defaults, 0)->requests[0].prompt),
            "user: In the\nassistant:");
  const std::string text = api::GeneratedText(want[0], {"\nuser:"}, served.tok);
  EXPECT_EQ(r["choices"][0]["message"]["content"],
            json::parse(json(text).dump(-1, ' ', false, json::error_handler_t::replace)));
  EXPECT_EQ(r["object"], "chat.completion");
  // Streamed with n = 2 (greedy: the same reply twice), each choice's deltas add up.
  const std::string streamed = R"({"messages": [{"role": "user", "content": "In the"}],
      "max_tokens": 8, "temperature": 0, "stream": true, "n": 2})";
  res = client.Post("/v1/chat/completions", streamed, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  std::vector<std::string> content(2);
  for (size_t at = 0; (at = res->body.find("data: ", at)) != std::string::npos; ++at) {
    const std::string data = res->body.substr(at + 6, res->body.find("\n\n", at) - at - 6);
    if (data == "[DONE]") break;
    const json e = json::parse(data);
    const json& delta = e["choices"][0]["delta"];
    const int index = e["choices"][0]["index"];
    ASSERT_LT(index, 2);
    if (delta.contains("content")) content[index] += delta["content"].get<std::string>();
  }
  for (int i = 0; i < 2; ++i) EXPECT_EQ(json(content[i]), r["choices"][0]["message"]["content"]);
  // vLLM's tokenizer endpoints: text, or messages rendered as chat requests are.
  res = client.Post("/tokenize", R"({"prompt": "ab"})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body),
            json({{"count", 2}, {"max_model_len", 64}, {"tokens", {97, 98}}}))
      << res->body;
  res = client.Post("/tokenize", R"({"messages": [{"role": "user", "content": "In the"}]})",
                    "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["tokens"], json(served.tok.Encode("user: In the\nassistant:")))
      << res->body;
  res = client.Post("/tokenize", R"({"prompt": "ab", "add_special_tokens": true})",
                    "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["tokens"], json({served.tok.bos_id(), 97, 98})) << res->body;
  res = client.Post("/tokenize", R"({"messages": [], "add_generation_prompt": false})",
                    "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400) << res->body;
  res = client.Post("/detokenize", R"({"tokens": [73, 110]})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body), json({{"prompt", "In"}})) << res->body;
  for (const char* bad : {R"({"tokens": [73, 999]})", R"({"tokens": "In"})"}) {
    res = client.Post("/detokenize", bad, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400) << bad;
    EXPECT_NE(json::parse(res->body)["error"]["message"].get<std::string>().find(
                  "\"tokens\" must be a list of token ids in [0, 258)"),
              std::string::npos)
        << res->body;
  }
  res = client.Post("/tokenize", R"({"prompt": "a", "messages": []})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  res = client.Post("/v1/chat/completions", R"({"messages": []})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(json::parse(res->body)["error"]["type"], "invalid_request_error");
}

}  // namespace
}  // namespace eellm
