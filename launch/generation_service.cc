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
  if (!job.status.ok()) return job.status;
  return std::move(job.results);
}

void GenerationService::Work() {
  const size_t room = static_cast<size_t>(gen_->max_sequences());
  for (;;) {
    std::vector<GenerationRequest> batch;
    std::vector<std::pair<Job*, size_t>> owners;  // per sequence of the batch: job, index
    {
      std::unique_lock<std::mutex> lock(mu_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left
      while (!queue_.empty() && batch.size() < room) {
        Job* job = queue_.front();
        const size_t take = std::min(room - batch.size(), job->requests->size() - job->next);
        for (size_t k = 0; k < take; ++k) {
          batch.push_back((*job->requests)[job->next + k]);
          owners.emplace_back(job, job->next + k);
        }
        job->next += take;
        if (job->next == job->requests->size()) queue_.pop_front();
      }
    }
    auto results = gen_->GenerateBatch(batch);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.batches++;
      stats_.largest_batch = std::max(stats_.largest_batch, static_cast<int>(batch.size()));
      for (size_t i = 0; i < owners.size(); ++i) {
        auto [job, index] = owners[i];
        if (results.ok()) {
          stats_.sequences++;
          stats_.tokens += static_cast<int64_t>((*results)[i].tokens.size());
          job->results[index] = std::move((*results)[i]);
        } else {
          job->status = results.status();
        }
        job->remaining--;
      }
    }
    done_.notify_all();
  }
}

}  // namespace eellm
