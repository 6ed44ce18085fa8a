// Shares one Generator between many caller threads (the HTTP server's handlers). Requests queue
// in arrival order; one worker thread runs their sequences in batches of up to the generator's
// max_sequences, and the sequences of several requests share a batch. A request with more
// prompts than a batch holds spreads over several batches. Callers block until their request is
// done. Bad requests are refused before they queue, so they never fail another caller's batch.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "models/generator.h"

namespace eellm {

class GenerationService {
 public:
  explicit GenerationService(Generator* generator);
  // Finishes the queued requests, then stops the worker.
  ~GenerationService();
  GenerationService(const GenerationService&) = delete;
  GenerationService& operator=(const GenerationService&) = delete;

  // Generates every request (a whole request fails if any prompt is bad; the error names it).
  absl::StatusOr<std::vector<GenerationResult>> Generate(
      const std::vector<GenerationRequest>& requests);

  struct Stats {
    int64_t requests = 0;   // Generate calls completed
    int64_t sequences = 0;  // sequences generated
    int64_t batches = 0;    // batches run
    int64_t tokens = 0;     // tokens generated
    int largest_batch = 0;  // most sequences in one batch
  };
  Stats stats() const;
  const Generator& generator() const { return *gen_; }

 private:
  struct Job {
    const std::vector<GenerationRequest>* requests;
    std::vector<GenerationResult> results;
    size_t next = 0;       // first sequence not yet given to a batch
    size_t remaining = 0;  // sequences not yet generated
    absl::Status status;
  };
  void Work();

  Generator* gen_;
  mutable std::mutex mu_;
  std::condition_variable queued_;  // a job was queued, or the service is stopping
  std::condition_variable done_;    // a batch finished
  std::deque<Job*> queue_;          // jobs with sequences not yet given to a batch
  bool stopping_ = false;
  Stats stats_;
  std::thread worker_;
};

}  // namespace eellm
