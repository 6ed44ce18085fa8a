// End-to-end tests of batched generation and serving through the `eellm` binary: `bench
// generate`, `serve` (answering, stopping on signals) and, under mpirun, tensor-parallel
// `generate` and `serve` against a single process.
#include <cctype>
#include <sstream>
#include <string>

#include "nlohmann/json.hpp"
#include "tests/launch/cli_fixture.h"

namespace eellm {
namespace {

using cli::CliTest;
using cli::kTinyModel;
using cli::ParallelCliTest;
using testing::CmdResult;
using testing::Describe;
using testing::Quote;
using testing::RunEellm;

// `eellm bench generate`: both runs per threshold, the same tokens batched and one at a time
// (and, under mpirun, from a pipeline and from one process).
TEST_F(ParallelCliTest, BenchGenerateComparesBatchedWithOneAtATime) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  const std::string args = "bench generate --checkpoint=" + Quote(ckpt) +
                           " --batch=3 --new-tokens=6 --thresholds=1.0,0.5";
  CmdResult r = RunEellm(args + " --draft-exits=1 --draft-tokens=2");
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  std::smatch m;
  for (const char* th : {"1.00", "0.50"}) {
    EXPECT_TRUE(std::regex_search(
        r.output, m,
        std::regex(std::string("\n") + th +
                   R"( +\| +[0-9.]+ \| +[0-9.]+ \| +[0-9.]+x \| .* \| 3 of 3\n)")))
        << Describe(args, r);
  }
  // Self-speculative decoding from the exit at layer 1: the full model's tokens (greedy).
  EXPECT_NE(r.output.find("self-speculative decoding (at most 2 drafts a round"), std::string::npos)
      << r.output;
  EXPECT_TRUE(std::regex_search(
      r.output, m,
      std::regex(R"(\n1 +\|( +[0-9.]+){2} +[0-9.]+x \|( +[0-9.]+){2} +[0-9.]+x \| +[0-9.]+% \| )"
                 R"( +[0-9.]+ \| 3 of 3\n)")))
      << r.output;
  // Under mpirun, a pipeline of two stages against one process: the same tokens; rank 0 prints.
  CmdResult piped = RunEellm(args + " --pp=2", Mpirun(2));
  ASSERT_EQ(piped.exit_code, 0) << Describe(args + " --pp=2", piped);
  EXPECT_NE(piped.output.find("pipeline: 2 stages x tensor parallelism 1"), std::string::npos)
      << piped.output;
  EXPECT_TRUE(std::regex_search(
      piped.output, m, std::regex(R"(threshold 0.50: time in passes, per rank: \d+% \d+%)")))
      << piped.output;
  for (const char* th : {"1.00", "0.50"}) {
    EXPECT_TRUE(std::regex_search(
        piped.output, m,
        std::regex(std::string("\n") + th +
                   R"( +\| +[0-9.]+ \| +[0-9.]+ \| +[0-9.]+x \| .* \| 3 of 3\n)")))
        << Describe(args + " --pp=2", piped);
  }
  CmdResult bad = RunEellm("bench generate --checkpoint=" + Quote(ckpt) + " --thresholds=0.8,2");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--thresholds: \"2\" is not a threshold in (0, 1]"), std::string::npos)
      << bad.output;
  bad = RunEellm("bench generate --checkpoint=" + Quote(ckpt) + " --draft-exits=1,x");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--draft_exits: \"x\" is not a layer number"), std::string::npos)
      << bad.output;
  bad = RunEellm(args + " --pp=2 --draft-exits=1", Mpirun(2));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--draft_exits runs in one process"), std::string::npos) << bad.output;
}

// `eellm serve` on a free port: it prints where it listens, answers a request, and on SIGTERM
// stops cleanly with its counters; bad flags are refused naming the value.
TEST_F(CliTest, ServeAnswersAndStopsOnSigterm) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  CmdResult bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --max-batch=0");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--max_batch must be in [1, 4096], got 0"), std::string::npos)
      << bad.output;
  bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --kv-cache-tokens=-1");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--kv_cache_tokens must be in [0, 2^31 - 16], got -1"),
            std::string::npos)
      << bad.output;
  // A KV cache beyond the memory free (2e9 tokens: over a TB) is refused before allocating.
  bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --kv-cache-tokens=2000000000");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("a KV cache of 2000000000 tokens (--kv_cache_tokens) and the "),
            std::string::npos)
      << bad.output;
  bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --max-model-len=100000");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--max_model_len 100000 must be in [1, the model's max_seq_len"),
            std::string::npos)
      << bad.output;
  bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --chat-template=vicuna");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("unknown chat template \"vicuna\""), std::string::npos) << bad.output;
  bad = RunEellm("serve --checkpoint=" + Quote(ckpt) + " --prefill-chunk=-2");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--prefill_chunk must be >= 0, got -2"), std::string::npos)
      << bad.output;
  // One KV cache of 16 tokens (a page) for both slots, each of at most 24 tokens.
  const std::string args =
      "--checkpoint=" + Quote(ckpt) + " --max-batch=2 --kv-cache-tokens=16 --max-model-len=24";
  // A signal during start-up ends the server too. (Whether it lands before the server runs is
  // up to timing; ApiServer.StopBeforeServeIsKept tests that case deterministically.)
  pid_t pid = Launch(args, "", "early");
  ASSERT_GT(pid, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_TRUE(StopProcess(pid, pid)) << "SIGTERM during start-up was lost\n"
                                     << ReadText(Path("early.out"));
  Server s = StartServer(args, "", "serve");
  ASSERT_GT(s.port, 0) << s.output;
  const std::string reply =
      Put(s.port, R"({"prompts": ["ab"], "tokens_to_generate": 5, "use_early_exit": true,
                       "early_exit_thres": 0.5, "echo_prompts": true})");
  const std::string too_long = Put(s.port, R"({"prompts": ["ab"], "tokens_to_generate": 19})");
  const std::string past_context = Put(s.port, R"({"prompts": ["ab"], "tokens_to_generate": 23})");
  httplib::Client client("127.0.0.1", s.port);
  auto health = client.Get("/health");
  const bool gone = StopProcess(s.pid, s.pid);
  EXPECT_NE(too_long.find("prompt (2 tokens) + max_new_tokens (19) = 21 exceeds the KV cache's 16 "
                          "tokens"),
            std::string::npos)
      << too_long;
  EXPECT_NE(past_context.find("= 25 exceeds the context length 24"), std::string::npos)
      << past_context;
  ASSERT_TRUE(health);
  EXPECT_NE(health->body.find("\"kv_cache\":{\"in_use\":0,\"tokens\":16}"), std::string::npos)
      << health->body;
  const std::string text = ReadText(Path("serve.out"));
  EXPECT_TRUE(gone) << "the server did not stop on SIGTERM\n" << text;
  EXPECT_NE(reply.find("\"text\":[\"ab"), std::string::npos) << reply << "\n" << text;
  EXPECT_NE(reply.find("\"layers\""), std::string::npos) << reply;
  EXPECT_NE(text.find("1 prompts, 5 tokens"), std::string::npos) << text;
  EXPECT_NE(text.find("; context 24 tokens; KV cache of 16 tokens, "), std::string::npos) << text;
  // The byte-level tokenizer has no chat markers: chat needs --chat-template.
  EXPECT_NE(text.find("chat template: none ("), std::string::npos) << text;
  EXPECT_NE(text.find("served 1 requests, 1 sequences, 5 tokens in 5 forward passes"),
            std::string::npos)
      << text;
}

// `eellm generate` under mpirun: two processes generate as one tensor-parallel group from a
// tp 2 checkpoint, and as a pipeline of two stages (--pp 2: the exit on stage 0, the final head
// on stage 1). The text, exits and depths are the single process's (the tiny model's logits are
// far from ties); only rank 0 prints; a layout other than the process count is refused.
TEST_F(ParallelCliTest, GenerateUnderTensorAndPipelineParallelism) {
  ASSERT_TRUE(TrainTinyModelTp2());
  const std::string gen = "generate --checkpoint=" + Quote(Path("run")) +
                          " --max-new-tokens=24 --threshold=0.3 --prompt=ab";
  CmdResult one = RunEellm(gen);
  CmdResult two = RunEellm(gen, Mpirun(2));
  CmdResult pp2 = RunEellm(gen + " --pp=2", Mpirun(2));
  ASSERT_EQ(one.exit_code, 0) << Describe(gen, one);
  ASSERT_EQ(two.exit_code, 0) << Describe(gen, two);
  ASSERT_EQ(pp2.exit_code, 0) << Describe(gen + " --pp=2", pp2);
  EXPECT_NE(pp2.output.find("pipeline of 2 stages x tensor parallelism 1"), std::string::npos)
      << pp2.output;
  // The generated text, the exit histogram and the average layers (not the timings).
  auto text_and_histogram = [](const std::string& out) {
    std::string kept;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);) {
      const size_t average = line.find("average layers");
      if (line.rfind("ab", 0) == 0 || line.find("exit histogram") != std::string::npos) {
        kept += line + "\n";
      } else if (average != std::string::npos) {
        kept += line.substr(average) + "\n";
      }
    }
    return kept;
  };
  EXPECT_FALSE(text_and_histogram(one.output).empty()) << one.output;
  EXPECT_EQ(text_and_histogram(two.output), text_and_histogram(one.output))
      << "one process:\n"
      << one.output << "\ntwo processes:\n"
      << two.output;
  EXPECT_EQ(text_and_histogram(pp2.output), text_and_histogram(one.output))
      << "one process:\n"
      << one.output << "\ntwo stages:\n"
      << pp2.output;
  for (const CmdResult* r : {&two, &pp2}) {
    size_t headers = 0;
    for (size_t at = 0; (at = r->output.find("--- early exit", at)) != std::string::npos; ++at) {
      ++headers;
    }
    EXPECT_EQ(headers, 1u) << "only rank 0 prints\n" << r->output;
  }
  CmdResult bad = RunEellm(gen + " --tp=4", Mpirun(2));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--tp 4 x --pp 1 must equal the number of processes (2)"),
            std::string::npos)
      << bad.output;
  bad = RunEellm(gen + " --pp=4", Mpirun(2));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--tp 1 x --pp 4 must equal the number of processes (2)"),
            std::string::npos)
      << bad.output;

  // Self-speculative decoding: the full model's tokens, from one process and from a tensor-parallel
  // pair alike (same drafts kept); a pipeline refuses it, naming why.
  const std::string spec = "generate --checkpoint=" + Quote(Path("run")) +
                           " --max-new-tokens=24 --prompt=ab --draft-exit=1 --draft-tokens=3 "
                           "--compare";
  CmdResult s1 = RunEellm(spec), s2 = RunEellm(spec, Mpirun(2));
  ASSERT_EQ(s1.exit_code, 0) << Describe(spec, s1);
  ASSERT_EQ(s2.exit_code, 0) << Describe(spec, s2);
  auto text_and_drafts = [&](const std::string& out) {
    std::string kept = text_and_histogram(out);
    const size_t at = out.find("drafts kept");
    return at == std::string::npos ? kept : kept + out.substr(at, out.find('\n', at) - at);
  };
  for (const CmdResult* r : {&s1, &s2}) {
    EXPECT_NE(r->output.find("first 24 tokens identical to the full model"), std::string::npos)
        << r->output;
    EXPECT_NE(r->output.find("--- self-speculative (exit at layer 1 drafts 3 tokens a round)"),
              std::string::npos)
        << r->output;
  }
  EXPECT_NE(text_and_drafts(s1.output).find("drafts kept"), std::string::npos) << s1.output;
  EXPECT_EQ(text_and_drafts(s2.output), text_and_drafts(s1.output)) << s2.output;
  bad = RunEellm(spec + " --pp=2", Mpirun(2));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("speculative decoding needs the whole model in one pipeline stage"),
            std::string::npos)
      << bad.output;
}

// `eellm serve` under mpirun: two processes serve as one tensor-parallel group. Rank 0 answers
// what a single-process server answers (text, exit depths, finish reasons; a stop string ends
// one prompt on the leader, whose follower then retires it), and SIGTERM to rank 0 stops the
// whole group after the request in flight. The same from a pipeline of two stages (--pp 2).
TEST_F(ParallelCliTest, ServeUnderTensorAndPipelineParallelism) {
  ASSERT_TRUE(TrainTinyModelTp2());
  const std::string args = "--checkpoint=" + Quote(Path("run")) + " --max-batch=4";
  Server one = StartServer(args, "", "one");
  Server two = StartServer(args, Mpirun(2), "two");
  Server stages = StartServer(args + " --pp=2", Mpirun(2), "stages");
  ASSERT_GT(one.port, 0) << one.output;
  ASSERT_GT(two.port, 0) << two.output;
  ASSERT_GT(stages.port, 0) << stages.output;
  EXPECT_NE(two.output.find("tensor parallelism 2"), std::string::npos) << two.output;
  EXPECT_NE(stages.output.find("tensor parallelism 1 x 2 pipeline stages"), std::string::npos)
      << stages.output;
  // The stop string: a printable character the second prompt generates (the tiny model's bytes
  // are near random), so that one sequence stops on it and the others run on.
  const std::string probe = R"({"prompts": ["ab", "the", "x"], "tokens_to_generate": 12,
      "temperature": 0.7, "random_seed": 5})";
  const std::string first = Put(one.port, probe);
  ASSERT_FALSE(first.empty());
  std::string stop;
  const nlohmann::json probed = nlohmann::json::parse(first);
  for (const auto& seg : probed["segments"][1]) {
    const std::string t = seg.get<std::string>();
    if (t.size() == 1 && std::isalnum(static_cast<unsigned char>(t[0]))) stop = t;
  }
  ASSERT_FALSE(stop.empty()) << "probe: " << first;
  const std::string body = R"({"prompts": ["ab", "the", "x"], "tokens_to_generate": 12,
      "temperature": 0.7, "random_seed": 5, "use_early_exit": true, "early_exit_thres": 0.3, "stop_sequences": [")" +
                           stop + R"("]})";
  const std::string a = Put(one.port, body), b = Put(two.port, body);
  const std::string c = Put(stages.port, body);
  EXPECT_TRUE(StopProcess(one.pid, one.pid));
  EXPECT_TRUE(StopProcess(two.rank0, two.pid)) << "the group did not stop\n"
                                               << ReadText(Path("two.out"));
  EXPECT_TRUE(StopProcess(stages.rank0, stages.pid)) << "the pipeline did not stop\n"
                                                     << ReadText(Path("stages.out"));
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(b, a) << "one process:\n" << a << "\ntwo processes:\n" << b;
  EXPECT_EQ(c, a) << "one process:\n" << a << "\ntwo stages:\n" << c;
  EXPECT_NE(a.find("\"stop\""), std::string::npos) << "no prompt met the stop string\n" << a;
  EXPECT_NE(ReadText(Path("two.out")).find("served 1 requests, 3 sequences"), std::string::npos)
      << ReadText(Path("two.out"));
}

}  // namespace
}  // namespace eellm
