// `eellm serve`: loads a checkpoint and answers generation requests over HTTP (launch/api_server.h
// describes the API) until SIGINT or SIGTERM; concurrent requests share forward passes. Under
// mpirun or Slurm the processes serve as one tensor-parallel group, or as a pipeline of them
// (--pp): rank 0 runs the HTTP server and leads, the other ranks follow its passes on their
// shards (or run their stage's).
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "launch/api_server.h"
#include "launch/chat_template.h"
#include "launch/commands.h"
#include "launch/context_length.h"
#include "launch/generation_service.h"
#include "launch/inference_group.h"
#include "launch/shared_flags.h"
#include "models/generator.h"
#include "models/pipeline_generator.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, port, 5000, "port to listen on (0: any free port, printed at start)");
ABSL_FLAG(int, max_batch, 16, "most sequences generated together");
ABSL_FLAG(int64_t, kv_cache_tokens, 0,
          "tokens the KV cache holds for all sequences together, in pages of 16: a request is "
          "admitted when its prompt's pages are free and takes pages as it grows; when they run "
          "out, the latest admitted sequences are preempted and resume later (with --pp > 1 a "
          "request takes its prompt + max tokens at admission). 0: the model's context times "
          "--max_batch");
ABSL_FLAG(bool, kv_reserve, false,
          "take each request's prompt + max tokens at admission, so that "
          "nothing is preempted (fewer sequences run together when they stop early)");
ABSL_FLAG(bool, prefix_caching, true,
          "keep the K/V pages of prompts and answers after their sequences end, found by their "
          "tokens, so that a prompt starting with the same whole pages of 16 tokens (a shared "
          "system prompt, a conversation's earlier turns) reuses them instead of computing them; "
          "they give way, least recently used first, when pages run out");
ABSL_FLAG(int, prefill_chunk, 512,
          "chunked prefill: prompt tokens one forward pass takes from the prefilling requests "
          "together; longer prompts go on in the next passes, so that running requests keep "
          "getting tokens (0: whole prompts)");
ABSL_FLAG(std::string, chat_template, "auto",
          "the prompt format of POST /v1/chat/completions: chatml (Qwen and other ChatML "
          "models), llama3, plain (\"role: content\" lines), or auto: chatml or llama3 when the "
          "tokenizer has their markers as tokens");
ABSL_FLAG(double, default_threshold, 0.8,
          "early-exit threshold of requests that set use_early_exit without early_exit_thres");

namespace eellm {

int RunServeCommand() {
  // SIGINT/SIGTERM are taken by a thread (sigwait) that stops the server. Block them before
  // anything starts a thread (MPI's progress threads included), so that every thread inherits
  // the mask and none takes the default action. Followers block them too: they stop when the
  // leader tells them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  InferenceGroup group;
  auto Fail = [&](const absl::Status& s) { return group.Fail(s); };
  if (absl::Status s = StartInferenceGroup(&group, absl::GetFlag(FLAGS_tp), absl::GetFlag(FLAGS_pp),
                                           "the server");
      !s.ok()) {
    return Fail(s);
  }
  const bool multi = group.multi, leader = group.launch.rank == 0;
  const int tp = group.tp;
  const std::string path = absl::GetFlag(FLAGS_checkpoint);
  if (path.empty()) return Fail(absl::InvalidArgumentError("--checkpoint is required"));
  const int max_batch = absl::GetFlag(FLAGS_max_batch);
  if (max_batch < 1 || max_batch > 4096) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--max_batch must be in [1, 4096], got ", max_batch)));
  }
  const int64_t kv_tokens = absl::GetFlag(FLAGS_kv_cache_tokens);
  // (2^31 less a page: the pages' count stays an int)
  if (kv_tokens < 0 || kv_tokens > (int64_t{1} << 31) - Generator::kKvPageTokens) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--kv_cache_tokens must be in [0, 2^31 - 16], got ", kv_tokens)));
  }
  const int prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  if (prefill_chunk < 0) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--prefill_chunk must be >= 0, got ", prefill_chunk)));
  }
  const double th = absl::GetFlag(FLAGS_default_threshold);
  if (!(th > 0 && th <= 1)) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--default_threshold must be in (0, 1], got ", th)));
  }
  const int port = absl::GetFlag(FLAGS_port);
  if (port < 0 || port > 65535) {
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("--port must be in [0, 65535], got ", port)));
  }
  if (absl::Status s = LoadInferenceModel(&group, path, absl::GetFlag(FLAGS_backend)); !s.ok()) {
    return Fail(s);
  }
  // The service's host-memory messages travel on a communicator of their own; the model's
  // collectives use the group's (on the backend's memory).
  Communicator* messages = group.messages.get();
  Model& model = *group.loaded.model;
  const ModelConfig& c = model.config();
  // By default one pool of a context per slot: every sequence fits (nothing is preempted), and
  // pages are shared and cached (prefix caching).
  auto context = ContextLength(c, absl::GetFlag(FLAGS_max_model_len), 0);
  if (!context.ok()) return Fail(context.status());
  const int64_t pool =
      kv_tokens > 0 ? kv_tokens
                    : int64_t{max_batch} * Generator::PagesFor(*context) * Generator::kKvPageTokens;
  if (kv_tokens == 0 && pool > (int64_t{1} << 31) - Generator::kKvPageTokens) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--max_batch ", max_batch, " x the context ", *context,
                     " tokens exceeds a KV cache of 2^31 tokens: set --kv_cache_tokens")));
  }
  const std::string sized_by =
      kv_tokens > 0 ? "--kv_cache_tokens"
                    : absl::StrCat("--max_batch ", max_batch, " x the context ", *context);
  const int64_t available =
      AvailablePerProcess(model.backend()->AvailableMemoryBytes(),
                          model.backend()->device() == Device::kCpu, group.launch.local_size);
  if (absl::Status s = CheckGeneratorFits(
          Generator::PlannedBytes(model, *context, max_batch, static_cast<int>(pool)), pool,
          available, sized_by);
      !s.ok()) {
    return Fail(s);
  }
  Generator generator(&model, *context, max_batch, static_cast<int>(pool));
  generator.set_token_limit(group.token_limit);
  if (absl::GetFlag(FLAGS_kv_reserve)) generator.ReserveKvPerRequest();
  if (absl::GetFlag(FLAGS_prefix_caching)) generator.EnablePrefixCaching();
  generator.SetPrefillChunk(prefill_chunk);
  // A pipeline (--pp): rank 0 leads it and serves; the other ranks run their stage's passes. A
  // single tensor-parallel group: the followers mirror rank 0's generator.
  std::unique_ptr<PipelineGenerator> pipeline;
  if (group.pp > 1) {
    pipeline = std::make_unique<PipelineGenerator>(&generator, messages, group.pp, tp);
  }
  if (!leader) {
    if (pipeline != nullptr) {
      pipeline->Work();
    } else {
      GenerationService::Follow(&generator, messages);
    }
    return 0;
  }

  // The generation worker makes the group's MPI calls, so it runs on this (the main) thread;
  // the HTTP server answers on its own threads.
  SequenceBatcher* batcher = &generator;
  if (pipeline != nullptr) batcher = pipeline.get();
  GenerationService service(batcher, pipeline != nullptr ? nullptr : messages,
                            /*own_thread=*/false);
  ApiDefaults defaults;
  defaults.early_exit_threshold = static_cast<float>(th);
  defaults.seed = absl::GetFlag(FLAGS_seed);
  defaults.model_name = path;
  defaults.chat_template = absl::GetFlag(FLAGS_chat_template);
  if (auto chat = ResolveChatFormat(defaults.chat_template, *group.tokenizer); chat.ok()) {
    std::fprintf(stderr, "chat template: %s\n", ChatFormatName(*chat));
  } else if (defaults.chat_template == "auto") {
    std::fprintf(stderr, "chat template: none (%s); POST /v1/chat/completions answers 400\n",
                 std::string(chat.status().message()).c_str());
  } else {
    return Fail(chat.status());
  }
  ApiServer server(&service, group.tokenizer.get(), c, defaults);
  auto bound = server.Bind(absl::GetFlag(FLAGS_host), port);
  if (!bound.ok()) return Fail(bound.status());
  // The first signal stops the server (Stop() is repeated until Serve() returns: a Stop()
  // before the server runs would be lost); a second one exits at once.
  std::atomic<bool> served{false};
  std::thread stopper([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (served) return;
    std::fprintf(stderr,
                 "signal %d (%s): stopping after the requests in flight (again to exit now)\n", sig,
                 sig == SIGINT ? "SIGINT" : "SIGTERM");
    while (!served) {
      server.Stop();
      const timespec wait = {0, 50 * 1000 * 1000};
      if (sigtimedwait(&signals, nullptr, &wait) > 0 && !served) {
        std::fprintf(stderr, "second signal: exiting without finishing the requests in flight\n");
        std::_Exit(1);
      }
    }
  });
  std::printf("serving %s (%d layers, exits at layers", path.c_str(), c.num_layers);
  for (const ExitConfig& x : c.exits) std::printf(" %d", x.layer);
  std::printf(
      ") on http://%s:%d: PUT /api, POST /v1/completions, GET /health; up to %d sequences at a "
      "time",
      absl::GetFlag(FLAGS_host).c_str(), *bound, max_batch);
  std::printf("; context %d tokens; KV cache of %d tokens, %s per process", generator.capacity(),
              generator.kv_tokens(),
              ByteSize(int64_t{generator.kv_tokens()} * Generator::KvBytesPerToken(model)).c_str());
  if (!generator.kv_on_demand()) {
    std::printf(" (reserved per request)");
  } else if (kv_tokens == 0) {
    std::printf(" (pages on demand, a context per slot)");
  } else {
    std::printf(" (pages on demand, preempting the latest sequences when they run out)");
  }
  if (generator.prefix_caching()) std::printf(", prefix caching");
  if (generator.prefill_chunk() > 0) {
    std::printf("; prefill chunks of %d tokens", generator.prefill_chunk());
  }
  if (multi) std::printf("; tensor parallelism %d", tp);
  if (group.pp > 1) std::printf(" x %d pipeline stages", group.pp);
  // Under mpirun, signalling mpirun ends the job at once; SIGTERM to this pid stops gracefully.
  std::printf("; pid %d\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  std::thread http([&] {
    server.Serve();
    service.Shutdown();  // Run() finishes the requests in flight, then returns
  });
  service.Run();
  if (pipeline != nullptr) pipeline->Stop();  // the other ranks return
  served = true;
  pthread_kill(stopper.native_handle(), SIGTERM);  // ends the sigwait if no signal came
  stopper.join();
  http.join();
  const GenerationService::Stats st = service.stats();
  std::printf(
      "served %lld requests, %lld sequences, %lld tokens in %lld forward passes (up to %d "
      "sequences each; %lld preemptions; %lld prefill tokens from the prefix cache)\n",
      static_cast<long long>(st.requests), static_cast<long long>(st.sequences),
      static_cast<long long>(st.tokens), static_cast<long long>(st.steps), st.largest_batch,
      static_cast<long long>(st.preemptions), static_cast<long long>(st.prefix_cached_tokens));
  return 0;
}

}  // namespace eellm
