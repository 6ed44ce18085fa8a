#include "launch/generation_service.h"

#include <algorithm>
#include <utility>

#include "engine/core/status.h"

namespace eellm {

GenerationService::GenerationService(Generator* generator)
    : gen_(generator), worker_([this] { Work(); }) {}

GenerationService::~GenerationService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  queued_.notify_all();
  worker_.join();
}

GenerationService::Stats GenerationService::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

absl::StatusOr<std::vector<GenerationResult>> GenerationService::Generate(
    const std::vector<GenerationRequest>& requests) {
  RETURN_IF_ERROR(gen_->ValidateAll(requests));
  Job job;
  job.requests = &requests;
  job.results.resize(requests.size());
  job.remaining = requests.size();
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("the generation service is stopping");
  queue_.push_back(&job);
  queued_.notify_one();
  done_.wait(lock, [&] { return job.remaining == 0; });
  stats_.requests++;
  return std::move(job.results);
}

void GenerationService::Work() {
  // The generator is used by this thread alone; the lock guards the queue, jobs and stats.
  std::vector<std::pair<Job*, size_t>> owner(gen_->max_sequences());  // slot -> job, index
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty() || gen_->active() > 0; });
      if (queue_.empty() && gen_->active() == 0) return;  // stopping, and nothing left
      while (!queue_.empty() && gen_->free_slots() > 0) {
        Job* job = queue_.front();
        auto slot = gen_->Admit((*job->requests)[job->next]);
        EE_CHECK(slot.ok(), "admitting a validated request failed: ", slot.status().message());
        owner[*slot] = {job, job->next};
        if (++job->next == job->requests->size()) queue_.pop_front();
      }
    }
    const int running = gen_->active();
    std::vector<Generator::Finished> finished = gen_->Advance();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.steps++;
      stats_.largest_batch = std::max(stats_.largest_batch, running);
      for (Generator::Finished& f : finished) {
        auto [job, index] = owner[f.slot];
        stats_.sequences++;
        stats_.tokens += static_cast<int64_t>(f.result.tokens.size());
        job->results[index] = std::move(f.result);
        job->remaining--;
      }
    }
    if (!finished.empty()) done_.notify_all();
  }
}

}  // namespace eellm
