// Shares one Generator between many caller threads (the HTTP server's handlers) with continuous
// batching: requests queue in arrival order, and the worker admits their sequences into the
// generator's free slots between forward passes, so a new sequence's prefill joins the running
// sequences' decode and a finished sequence's slot is taken at once. Sequences of several
// requests share passes; a request with more prompts than there are slots spreads over time.
// Callers block until their request is done. Bad requests are refused before they queue, so they
// never fail another caller's sequences.
//
// The generator: a Generator, or the leader of a pipeline (PipelineGenerator), whose other ranks
// take their work from it.
//
// Tensor parallelism: the service runs on rank 0 of the group (the leader) and, before each
// pass, sends what changed (sequences admitted, sequences its stop rules ended) to the other
// ranks, which mirror it in Follow(). `group` carries these host-memory messages (a communicator
// made without a device backend); the model's own collectives use its TpSpec's. The worker then
// makes MPI calls, so it must be the process's main thread: construct with own_thread = false
// and call Run() there.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "models/generator.h"
#include "parallel/comm/communicator.h"

namespace eellm {

class GenerationService {
 public:
  // `group`: the tensor-parallel group this rank leads (rank 0), or null. `own_thread`: start a
  // worker thread running Run(); otherwise the caller runs it.
  explicit GenerationService(SequenceBatcher* generator, Communicator* group = nullptr,
                             bool own_thread = true);
  // Shutdown(), and joins the worker thread if it owns one.
  ~GenerationService();
  GenerationService(const GenerationService&) = delete;
  GenerationService& operator=(const GenerationService&) = delete;

  // Generates every request (a whole request fails if any prompt is bad; the error names it).
  // Streaming: on_token(i, token) is called on the worker thread as prompt i produces a token (it
  // must not block). Setting *cancelled ends the request's sequences before the next pass (their
  // results: the tokens so far, FinishReason::kCancelled).
  absl::StatusOr<std::vector<GenerationResult>> Generate(
      const std::vector<GenerationRequest>& requests,
      const std::function<void(int, int32_t)>& on_token = nullptr,
      const std::atomic<bool>* cancelled = nullptr);

  // The worker: admits and advances until Shutdown() and every queued request is done; then
  // tells the followers to stop.
  void Run();
  void Shutdown();

  // A follower rank of `group`: mirrors the leader's admissions and passes until it stops.
  static void Follow(Generator* generator, Communicator* group);

  // Observations in seconds, counted in the buckets of Prometheus's default histogram.
  struct Histogram {
    static constexpr std::array<double, 11> kBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                       0.5,   1,    2.5,   5,    10};
    std::array<int64_t, kBounds.size() + 1> counts{};  // per bucket; the last: above them all
    double sum = 0;
    int64_t count = 0;
    void Observe(double seconds);
  };
  struct Stats {
    int64_t requests = 0;                   // Generate calls completed
    int64_t sequences = 0;                  // sequences generated to their end
    int64_t cancelled = 0;                  // sequences cancelled (running or queued)
    int64_t steps = 0;                      // forward passes the generator has run
    int64_t tokens = 0;                     // tokens generated (cancelled sequences' included)
    int64_t prompt_tokens = 0;              // of the sequences admitted
    std::map<int, int64_t> tokens_by_head;  // of the sequences ended: exit index (-1: final)
    int64_t drafted = 0, accepted = 0;      // speculative decoding, of the sequences ended
    int largest_batch = 0;                  // most sequences in one of them
    int64_t preemptions = 0;                // sequences preempted for KV pages (resumed later)
    int64_t prefix_cached_tokens = 0;       // prefill tokens whose K/V came from the prefix cache
    int kv_tokens_in_use = 0;               // of the KV cache, after the last pass
    int running = 0, waiting = 0;           // sequences admitted, and queued, after the last pass
    Histogram request_seconds;              // from Generate to its return
    Histogram first_token_seconds;          // per sequence, from its Generate to its first token
    Histogram inter_token_seconds;          // between a sequence's consecutive tokens
  };
  Stats stats() const;
  const SequenceBatcher& generator() const { return *gen_; }

 private:
  struct Job {
    const std::vector<GenerationRequest>* requests;
    const std::function<void(int, int32_t)>* on_token;
    const std::atomic<bool>* cancelled;
    std::vector<GenerationResult> results;
    size_t next = 0;       // first sequence not yet admitted
    size_t remaining = 0;  // sequences not yet generated
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  };
  // A sequence's end in the stats, and the gauges from the generator and queue now (under mu_).
  void Count(const GenerationResult& r);
  void UpdateGauges();

  SequenceBatcher* gen_;
  Communicator* group_;
  mutable std::mutex mu_;
  std::condition_variable queued_;  // a job was queued, or the service is stopping
  std::condition_variable done_;    // sequences finished
  std::deque<Job*> queue_;          // jobs with sequences not yet admitted
  bool stopping_ = false;
  Stats stats_;
  std::thread worker_;
};

}  // namespace eellm
