// The serving stack: request parsing (every bad field named), the generation service (concurrent
// requests share batches and each gets what it would get alone), and the HTTP server end to end
// on a local port.
#include "launch/api_server.h"

#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "launch/generation_service.h"
#include "nlohmann/json.hpp"
#include "tests/launch/served_model.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using nlohmann::json;

TEST(ApiRequest, MapsEveryFieldAndDefaults) {
  ByteTokenizer tok;
  ApiDefaults d;
  d.early_exit_threshold = 0.6f;
  auto call = ParseApiRequest(R"({"prompts": ["ab", ""]})", tok, d, 0);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_EQ(call->requests.size(), 2u);
  const GenerationRequest& a = call->requests[0];
  EXPECT_EQ(a.prompt, (std::vector<int32_t>{'a', 'b'}));
  EXPECT_EQ(call->requests[1].prompt, std::vector<int32_t>{tok.bos_id()});  // empty: BOS
  EXPECT_EQ(a.max_new_tokens, 64);
  EXPECT_EQ(a.eos_id, tok.eos_id());
  EXPECT_FLOAT_EQ(a.sampling.temperature, 0.0f);  // greedy, as EE-LLM's server
  EXPECT_FLOAT_EQ(a.sampling.top_p, 1.0f);
  EXPECT_FLOAT_EQ(a.early_exit.threshold, 1.0f);  // early exit off unless asked
  EXPECT_FALSE(a.speculative.enabled());          // so is speculative decoding
  EXPECT_EQ(call->requests[1].sampling.seed, a.sampling.seed + 1);
  EXPECT_FALSE(a.stop);
  auto other = ParseApiRequest(R"({"prompts": ["ab"]})", tok, d, 1);
  EXPECT_NE(other->requests[0].sampling.seed, a.sampling.seed) << "requests get distinct seeds";

  call = ParseApiRequest(R"({"prompts": ["ab"], "tokens_to_generate": 5, "temperature": 0,
      "top_k": 3, "top_p": 0.5, "random_seed": 42, "add_BOS": true, "logprobs": true,
      "use_early_exit": true, "exit_layers": [3], "stop_sequences": ["\n\n"],
      "print_max_prob": false, "echo_prompts": true, "no_log": true, "top_p_decay": 0,
      "top_p_bound": 0, "prevent_newline_after_colon": false, "beam_width": 1,
      "length_penalty": 1.5})",
                         tok, d, 0);
  ASSERT_TRUE(call.ok()) << call.status();
  const GenerationRequest& b = call->requests[0];
  EXPECT_EQ(b.prompt, (std::vector<int32_t>{tok.bos_id(), 'a', 'b'}));
  EXPECT_EQ(b.max_new_tokens, 5);
  EXPECT_EQ(b.sampling.temperature, 0.0f);
  EXPECT_EQ(b.sampling.top_k, 3);
  EXPECT_FLOAT_EQ(b.sampling.top_p, 0.5f);
  EXPECT_EQ(b.sampling.seed, 42u);
  EXPECT_FLOAT_EQ(b.early_exit.threshold, 0.6f);  // the server's default threshold
  EXPECT_TRUE(b.prompt_logprobs);                 // logprobs with echo_prompts: the prompt's too
  EXPECT_TRUE(call->echo);
  EXPECT_TRUE(call->no_log);
  EXPECT_EQ(b.early_exit.exit_layers, std::vector<int>{3});
  EXPECT_TRUE(call->logprobs);
  ASSERT_TRUE(b.stop);
  EXPECT_FALSE(b.stop({'x', '\n'}));
  EXPECT_TRUE(b.stop({'x', '\n', '\n', 'y'}));
  // As EE-LLM's server: early exit only with use_early_exit (a threshold alone does not turn it
  // on); one prompt as a string; logprobs without echo_prompts: no prompt scoring.
  call =
      ParseApiRequest(R"({"prompts": "ab", "early_exit_thres": 0.3, "logprobs": true})", tok, d, 0);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_EQ(call->prompts, std::vector<std::string>{"ab"});
  EXPECT_FLOAT_EQ(call->requests[0].early_exit.threshold, 1.0f);
  EXPECT_FALSE(call->requests[0].prompt_logprobs);
  EXPECT_FALSE(call->echo);
  // tokens_to_generate 0 scores the prompt: logprobs on, as EE-LLM's server turns them on.
  call = ParseApiRequest(R"({"prompts": ["ab"], "tokens_to_generate": 0})", tok, d, 0);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_TRUE(call->logprobs);
  EXPECT_TRUE(call->requests[0].prompt_logprobs);
  call = ParseApiRequest(R"({"prompts": ["ab"], "early_exit_thres": 0.3, "use_early_exit": true})",
                         tok, d, 0);
  EXPECT_FLOAT_EQ(call->requests[0].early_exit.threshold, 0.3f);
  call = ParseApiRequest(R"({"prompts": ["ab"], "early_exit_thres": 0.3, "use_early_exit": false})",
                         tok, d, 0);
  EXPECT_FLOAT_EQ(call->requests[0].early_exit.threshold, 1.0f);
  call = ParseApiRequest(
      R"({"prompts": ["ab"], "draft_exit_layer": 2, "draft_tokens": 6, "draft_confidence": 0.4})",
      tok, d, 0);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_EQ(call->requests[0].speculative.exit_layer, 2);
  EXPECT_EQ(call->requests[0].speculative.draft_tokens, 6);
  EXPECT_FLOAT_EQ(call->requests[0].speculative.min_confidence, 0.4f);
  EXPECT_FLOAT_EQ(call->requests[0].early_exit.threshold, 1.0f);
}

TEST(ApiRequest, ErrorsNameTheFieldAndValue) {
  ByteTokenizer tok;
  ApiDefaults d;
  d.max_prompts = 2;
  const std::pair<const char*, const char*> cases[] = {
      {"not json", "not JSON"},
      {"[1]", "JSON object"},
      {"{}", "\"prompts\" is required"},
      {R"({"prompts": 5})", "\"prompts\" must be a list of strings, got 5"},
      {R"({"prompts": ["a"], "beam_width": 2})", "\"beam_width\" must be 1 (beam search"},
      {R"({"prompts": ["a"], "top_p_decay": 0.5})", "\"top_p_decay\" must be 0"},
      {R"({"prompts": ["a"], "prevent_newline_after_colon": true})",
       "\"prevent_newline_after_colon\" must be false"},
      {R"({"prompts": ["a"], "echo_prompts": 1})", "\"echo_prompts\" must be true or false"},
      {R"({"prompts": []})", "1 to 2 strings, got 0"},
      {R"({"prompts": ["a", "b", "c"]})", "1 to 2 strings, got 3"},
      {R"({"prompts": ["a"], "tokens_to_generate": -1})",
       "\"tokens_to_generate\" must be an integer >= 0, got -1"},
      {R"({"prompts": ["a"], "tokens_to_generate": 2.5})", "got 2.5"},
      {R"({"prompts": ["a"], "tokens_to_generate": 1e12})", "got 1000000000000.0"},
      {R"({"prompts": ["a"], "temperature": -1})", "\"temperature\" must be a number in [0, 1e30]"},
      {R"({"prompts": ["a"], "top_p": 1.5})",
       "\"top_p\" must be a number in [0, 1] (0 = off), got 1.5"},
      {R"({"prompts": ["a"], "top_k": "5"})", "\"top_k\" must be an integer >= 0, got \"5\""},
      {R"({"prompts": ["a"], "random_seed": -3})",
       "\"random_seed\" must be an integer >= 0, got -3"},
      {R"({"prompts": ["a"], "add_BOS": 1})", "\"add_BOS\" must be true or false, got 1"},
      {R"({"prompts": ["a"], "early_exit_thres": 0})",
       "\"early_exit_thres\" must be a number in (0, 1], got 0"},
      {R"({"prompts": ["a"], "exit_layers": [1.5]})",
       "\"exit_layers\" must be a list of layer numbers, got [1.5]"},
      {R"({"prompts": ["a"], "exit_layers": [4294967299]})", "got [4294967299]"},
      {R"({"prompts": ["a"], "tokens_to_generate": 1e300})", "got 1e+300"},
      {R"({"prompts": ["a"], "random_seed": 1e300})", "\"random_seed\" must be an integer"},
      {R"({"prompts": ["a"], "top_k": 4294967301})", "got 4294967301"},
      {R"({"prompts": [["a", ["b"]]]})", "must be a list of strings, got a nested array"},
      {R"({"prompts": ["a"], "stop_sequences": [""]})", "may not hold \"\""},
      {R"({"prompts": ["a"], "print_max_prob": true})", "\"print_max_prob\" must be false"},
      {R"({"prompts": ["a"], "max_tokens": 5})", "unknown field \"max_tokens\""},
      {R"({"prompts": ["a"], "draft_exit_layer": -2})",
       "\"draft_exit_layer\" must be a layer number >= 0 (0 = off), got -2"},
      {R"({"prompts": ["a"], "draft_tokens": 17})",
       "\"draft_tokens\" must be an integer in [1, 16], got 17"},
      {R"({"prompts": ["a"], "draft_confidence": 2})",
       "\"draft_confidence\" must be a number in [0, 1], got 2"},
  };
  // A value nested 100,000 deep is named by its type, not dumped (that would overflow the stack).
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  auto r = ParseApiRequest("{\"prompts\": " + deep + "}", tok, d, 0);
  EXPECT_NE(r.status().message().find("got a nested array"), std::string::npos) << r.status();
  for (const auto& [body, want] : cases) {
    auto r = ParseApiRequest(body, tok, d, 0);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(want), std::string::npos)
        << body << " -> " << r.status().message();
  }
}

TEST(ApiResponse, CutsAtStopSequencesAndReportsPerToken) {
  ByteTokenizer tok;
  auto call = *ParseApiRequest(R"({"prompts": ["Q:"], "stop_sequences": ["\n", "zz"],
      "logprobs": true, "echo_prompts": true})",
                               tok, ApiDefaults(), 0);
  GenerationResult g;
  g.tokens = {' ', 'a', 'z', 'z', 'b'};
  g.depth = {1, 4, 4, 2, 4};
  g.logprobs = {-0.5f, -1, -2, -3, -4};
  g.finish = FinishReason::kStop;
  const json r = json::parse(ApiResponse(call, {g}, tok));
  EXPECT_EQ(r["text"][0], "Q: a");
  EXPECT_EQ(r["segments"][0].size(), 7u);  // 2 prompt + 5 generated tokens
  EXPECT_EQ(r["segments"][0][2], " ");
  EXPECT_EQ(r["layers"][0], json({1, 4, 4, 2, 4}));
  EXPECT_EQ(r["logprobs"][0].size(), 5u);
  EXPECT_EQ(r["finish_reason"][0], "stop");
  // Without echo_prompts (EE-LLM's default): the generated part alone.
  call.echo = false;
  const json alone = json::parse(ApiResponse(call, {g}, tok));
  EXPECT_EQ(alone["text"][0], " a");
  EXPECT_EQ(alone["segments"][0].size(), 5u);
  EXPECT_EQ(alone["logprobs"][0], json({-0.5, -1.0, -2.0, -3.0, -4.0}));
  call.logprobs = false;
  EXPECT_FALSE(json::parse(ApiResponse(call, {g}, tok)).contains("logprobs"));
}

// Requests from several threads at once: each gets exactly what it gets alone, every sequence is
// generated once, passes hold at most max_sequences, and a request with more prompts than slots
// spreads over time. A bad request fails alone.
TEST(GenerationService, ConcurrentRequestsShareBatchesAndGetWhatTheyGetAlone) {
  testing::ServedModel served(4);
  Generator alone(served.model.get(), 64, 8);
  std::vector<std::vector<GenerationRequest>> reqs;
  const char* bodies[] = {
      R"({"prompts": ["In the", "And God"], "tokens_to_generate": 12, "temperature": 0,
          "use_early_exit": true, "early_exit_thres": 0.3})",
      R"({"prompts": ["x"], "tokens_to_generate": 20, "random_seed": 3, "top_k": 20})",
      R"({"prompts": ["a", "b", "c", "d", "e", "f"], "tokens_to_generate": 6,
          "use_early_exit": true, "early_exit_thres": 0.2, "random_seed": 9})",
      R"({"prompts": ["Lord"], "tokens_to_generate": 15, "temperature": 0.7,
          "use_early_exit": true, "early_exit_thres": 0.25, "exit_layers": [1, 3]})",
      R"({"prompts": ["long prompt of some length"], "tokens_to_generate": 9, "temperature": 0})",
  };
  for (int i = 0; i < 5; ++i) {
    auto call = ParseApiRequest(bodies[i], served.tok, ApiDefaults(), i);
    ASSERT_TRUE(call.ok()) << call.status();
    reqs.push_back(call->requests);
  }
  std::vector<absl::StatusOr<std::vector<GenerationResult>>> got(6);
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&, i] { got[i] = served.service.Generate(reqs[i]); });
  }
  std::vector<GenerationRequest> bad = reqs[0];
  bad[1].prompt.push_back(999);
  threads.emplace_back([&] { got[5] = served.service.Generate(bad); });
  for (auto& t : threads) t.join();
  ASSERT_FALSE(got[5].ok());
  EXPECT_NE(got[5].status().message().find("prompt 1: prompt token 999"), std::string::npos)
      << got[5].status();
  int sequences = 0, early = 0;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    auto want = *alone.GenerateBatch(reqs[i]);
    ASSERT_EQ(got[i]->size(), want.size());
    for (size_t s = 0; s < want.size(); ++s) {
      EXPECT_EQ((*got[i])[s].tokens, want[s].tokens) << "request " << i << " prompt " << s;
      EXPECT_EQ((*got[i])[s].exit_index, want[s].exit_index) << "request " << i << " prompt " << s;
      for (int e : want[s].exit_index) early += e >= 0;
    }
    sequences += static_cast<int>(want.size());
  }
  EXPECT_GT(early, 5);
  const GenerationService::Stats st = served.service.stats();
  EXPECT_EQ(st.sequences, sequences);
  EXPECT_EQ(st.requests, 5);  // the bad one was refused before it queued
  EXPECT_LE(st.largest_batch, 4);
  // The 6-prompt request runs 4 sequences at once, or joins others already running.
  EXPECT_GE(st.largest_batch, 2);
  EXPECT_GE(st.steps, 20);  // the longest request alone needs 20 passes
}

// A cancelled request ends before its tokens run out (the tokens so far, "cancelled"), and its
// slots serve the next request.
TEST(GenerationService, CancelledRequestsEndAndFreeTheirSlots) {
  testing::ServedModel served(2);
  Generator alone(served.model.get(), 64, 2);
  auto call = *ParseApiRequest(R"({"prompts": ["a", "b", "c"], "tokens_to_generate": 40,
      "temperature": 0})",
                               served.tok, ApiDefaults(), 0);
  std::atomic<bool> cancelled{false};
  std::atomic<int> seen{0};
  auto r = served.service.Generate(
      call.requests,
      [&](int, int32_t) {
        if (++seen == 5) cancelled = true;
      },
      &cancelled);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const GenerationResult& g : *r) {
    EXPECT_EQ(g.finish, FinishReason::kCancelled);
    EXPECT_LT(g.tokens.size(), 40u);
  }
  EXPECT_EQ((*r)[2].tokens.size(), 0u);                        // never admitted (two slots)
  const GenerationService::Stats st = served.service.stats();  // the gauges after the cancellation
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.waiting, 0);
  EXPECT_EQ(st.kv_tokens_in_use, 0);
  EXPECT_EQ(st.cancelled, 3);
  auto next = served.service.Generate({call.requests[0]});
  ASSERT_TRUE(next.ok());
  EXPECT_EQ((*next)[0].tokens, (*alone.GenerateBatch({call.requests[0]}))[0].tokens);
}

// The HTTP server on a free local port: a generation, an error, /health and an unknown path.
TEST(ApiServer, AnswersOverHttp) {
  testing::ServedModel served(4);
  Generator alone(served.model.get(), 64, 2);
  testing::LocalServer server(served);
  ASSERT_NE(server.port, 0);
  httplib::Client client("127.0.0.1", server.port);
  const std::string body =
      R"({"prompts": ["In the", "Lord"], "tokens_to_generate": 10, "temperature": 0,
          "use_early_exit": true, "early_exit_thres": 0.3, "logprobs": true, "echo_prompts": true})";
  auto res = client.Put("/api", body, "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200) << res->body;
  const json r = json::parse(res->body);
  auto call = *ParseApiRequest(body, served.tok, ApiDefaults(), 0);
  auto want = *alone.GenerateBatch(call.requests);
  for (int i = 0; i < 2; ++i) {
    // The random model's bytes are not always UTF-8; JSON carries them as U+FFFD.
    const json text = call.prompts[i] + served.tok.Decode(want[i].tokens);
    EXPECT_EQ(r["text"][i], json::parse(text.dump(-1, ' ', false, json::error_handler_t::replace)));
    EXPECT_EQ(r["layers"][i], json(want[i].depth));
    // Megatron's logprobs: every token after the first, the prompt's from the final head.
    ASSERT_EQ(r["logprobs"][i].size(), call.requests[i].prompt.size() - 1 + want[i].tokens.size());
    for (size_t p = 0; p + 1 < call.requests[i].prompt.size(); ++p) {
      EXPECT_FLOAT_EQ(r["logprobs"][i][p].get<float>(), want[i].prompt_logprobs.at(p));
    }
    EXPECT_FLOAT_EQ(r["logprobs"][i].back().get<float>(), want[i].logprobs.back());
  }
  // tokens_to_generate 0 scores the prompt only.
  res = client.Put("/api", R"({"prompts": ["In the"], "tokens_to_generate": 0, "logprobs": true})",
                   "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  const json scored = json::parse(res->body);
  EXPECT_EQ(scored["text"][0], "In the");
  ASSERT_EQ(scored["logprobs"][0].size(), 5u);
  EXPECT_FLOAT_EQ(scored["logprobs"][0][4].get<float>(), want[0].prompt_logprobs.at(4));
  res = client.Post("/api", R"({"prompts": ["a"], "tokens_to_generate": 100})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("exceeds the context length 64"), std::string::npos) << res->body;
  res = client.Get("/health");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  const json h = json::parse(res->body);
  EXPECT_EQ(h["served"]["sequences"], 3);
  EXPECT_EQ(h["model"]["exit_layers"], json({1, 2, 3}));
  // Prometheus metrics: the same counts; tokens by head add up; two requests timed, and the two
  // sequences that generated (the third only scored its prompt) their first token.
  res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4");
  std::map<std::string, double> metric;
  std::map<std::string, int> described;  // "# TYPE name": once per metric
  std::istringstream lines(res->body);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# TYPE ", 0) == 0) ++described[line.substr(7, line.find(' ', 7) - 7)];
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    metric[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  EXPECT_EQ(metric["eellm_requests_total"], 2) << res->body;
  EXPECT_EQ(metric["eellm_sequences_finished_total"], 3);
  size_t prompt_tokens = 6;  // "In the", scored
  int64_t generated = 0;
  for (int i = 0; i < 2; ++i) {
    prompt_tokens += call.requests[i].prompt.size();
    generated += static_cast<int64_t>(want[i].tokens.size());
  }
  EXPECT_EQ(metric["eellm_prompt_tokens_total"], prompt_tokens);
  EXPECT_EQ(metric["eellm_generation_tokens_total"], generated);
  double by_head = 0;
  for (const char* head : {"final@4", "exit@1pre", "exit@2", "exit@3"}) {
    const std::string key =
        absl::StrCat("eellm_generation_tokens_by_head_total{head=\"", head, "\"}");
    ASSERT_TRUE(metric.count(key)) << key << "\n" << res->body;
    by_head += metric[key];
  }
  EXPECT_EQ(by_head, generated);
  for (const auto& [name, n] : described) EXPECT_EQ(n, 1) << name;
  EXPECT_EQ(described.size(), 20u) << res->body;
  // Every generated token but each sequence's first follows another.
  EXPECT_EQ(metric["eellm_inter_token_latency_seconds_count"], generated - 2);
  EXPECT_EQ(metric["eellm_preemptions_total"], 0);
  EXPECT_EQ(metric["eellm_request_latency_seconds_count"], 2);
  EXPECT_EQ(metric["eellm_request_latency_seconds_bucket{le=\"+Inf\"}"], 2);
  double below = 0;  // buckets count every observation at or below their bound
  for (const double bound : GenerationService::Histogram::kBounds) {
    const double n =
        metric.at(absl::StrCat("eellm_request_latency_seconds_bucket{le=\"", bound, "\"}"));
    EXPECT_GE(n, below) << bound;
    below = n;
  }
  EXPECT_EQ(metric["eellm_time_to_first_token_seconds_count"], 2);
  EXPECT_EQ(metric["eellm_sequences_running"], 0);
  EXPECT_EQ(metric["eellm_max_batch"], 4);
  res = client.Get("/v1/completions");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_NE(res->body.find("no such endpoint"), std::string::npos) << res->body;
}

// A Stop() before Serve() is not lost: Serve() returns at once.
TEST(ApiServer, StopBeforeServeIsKept) {
  testing::ServedModel served(2);
  ApiServer server(&served.service, &served.tok, served.model->config(), ApiDefaults());
  ASSERT_TRUE(server.Bind("127.0.0.1", 0).ok());
  server.Stop();
  server.Serve();  // hangs (and the test times out) if the Stop() was lost
}

// A second server cannot take a port a server listens on (with SO_REUSEPORT it could, and the
// kernel would split the connections between the two).
TEST(ApiServer, RefusesAPortInUse) {
  testing::ServedModel served(2);
  ApiServer first(&served.service, &served.tok, served.model->config(), ApiDefaults());
  auto port = first.Bind("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  ApiServer second(&served.service, &served.tok, served.model->config(), ApiDefaults());
  auto again = second.Bind("127.0.0.1", *port);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find(absl::StrCat("cannot bind to 127.0.0.1:", *port)),
            std::string::npos)
      << again.status();
  first.Stop();
  second.Stop();
}

// Idle keep-alive connections (each holds a handler thread until its timeout, 5 s) do not keep a
// new client waiting: 30 of them against a generator of 2 slots.
TEST(ApiServer, IdleKeepAliveConnectionsDoNotStarveNewClients) {
  testing::ServedModel served(2);
  testing::LocalServer server(served);
  ASSERT_NE(server.port, 0);
  std::vector<std::unique_ptr<httplib::Client>> idle;
  for (int i = 0; i < 30; ++i) {
    idle.push_back(std::make_unique<httplib::Client>("127.0.0.1", server.port));
    idle.back()->set_keep_alive(true);
    auto res = idle.back()->Get("/health");
    ASSERT_TRUE(res && res->status == 200);
  }
  httplib::Client fresh("127.0.0.1", server.port);
  const auto start = std::chrono::steady_clock::now();
  auto res =
      fresh.Put("/api", R"({"prompts": ["a"], "tokens_to_generate": 2})", "application/json");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_LT(seconds, 1.0);
  idle.clear();  // their connections close, so the server's threads need not wait them out
}

// A burst of connections before the server accepts any: the kernel completes every handshake
// (cpp-httplib's own backlog of 5 would leave the rest to retry a second later).
TEST(ApiServer, QueuesABurstOfConnections) {
  testing::ServedModel served(2);
  ApiServer server(&served.service, &served.tok, served.model->config(), ApiDefaults());
  auto port = server.Bind("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(*port));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::vector<int> sockets;
  for (int i = 0; i < 32; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    ASSERT_GE(fd, 0);
    connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
    sockets.push_back(fd);
  }
  int connected = 0;
  for (int fd : sockets) {  // connected once writable without a socket error
    pollfd p{fd, POLLOUT, 0};
    int error = 0;
    socklen_t size = sizeof(error);
    if (poll(&p, 1, 500) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) == 0 &&
        error == 0) {
      ++connected;
    }
    close(fd);
  }
  EXPECT_EQ(connected, 32);
  server.Stop();
}

}  // namespace
}  // namespace eellm
