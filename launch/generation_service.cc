#include "launch/generation_service.h"

#include <algorithm>
#include <string>
#include <utility>

#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

// What a follower needs to repeat the leader's next pass: the slots to retire (sequences the
// leader's stop rules ended in the last pass) and the sequences admitted, in slot order.
// Stop rules themselves stay on the leader (they read text); sampling is repeated exactly.
struct StepMessage {
  bool stop = false;
  std::vector<int> retire;
  std::vector<std::pair<int, GenerationRequest>> admit;
};

std::string Encode(const StepMessage& m) {
  json admit = json::array();
  for (const auto& [slot, r] : m.admit) {
    admit.push_back({{"slot", slot},
                     {"prompt", r.prompt},
                     {"max_new_tokens", r.max_new_tokens},
                     {"eos_id", r.eos_id},
                     {"temperature", r.sampling.temperature},
                     {"top_k", r.sampling.top_k},
                     {"top_p", r.sampling.top_p},
                     {"seed", r.sampling.seed},
                     {"threshold", r.early_exit.threshold},
                     {"exit_layers", r.early_exit.exit_layers}});
  }
  return json{{"stop", m.stop}, {"retire", m.retire}, {"admit", admit}}.dump();
}

StepMessage Decode(const std::string& text) {
  const json j = json::parse(text);
  StepMessage m;
  m.stop = j["stop"].get<bool>();
  m.retire = j["retire"].get<std::vector<int>>();
  for (const json& a : j["admit"]) {
    GenerationRequest r;
    r.prompt = a["prompt"].get<std::vector<int32_t>>();
    r.max_new_tokens = a["max_new_tokens"].get<int>();
    r.eos_id = a["eos_id"].get<int>();
    r.sampling.temperature = a["temperature"].get<float>();
    r.sampling.top_k = a["top_k"].get<int>();
    r.sampling.top_p = a["top_p"].get<float>();
    r.sampling.seed = a["seed"].get<uint64_t>();
    r.early_exit.threshold = a["threshold"].get<float>();
    r.early_exit.exit_layers = a["exit_layers"].get<std::vector<int>>();
    m.admit.emplace_back(a["slot"].get<int>(), std::move(r));
  }
  return m;
}

// Broadcasts `m` from rank 0 of `group` (the size first), or receives it on the other ranks.
StepMessage Exchange(Communicator* group, const StepMessage* m) {
  std::string text = m != nullptr ? Encode(*m) : std::string();
  int64_t size = static_cast<int64_t>(text.size());
  group->Broadcast(&size, sizeof(size), 0);
  text.resize(size);
  group->Broadcast(text.data(), size, 0);
  return m != nullptr ? *m : Decode(text);
}

}  // namespace

GenerationService::GenerationService(Generator* generator, Communicator* group, bool own_thread)
    : gen_(generator), group_(group) {
  EE_CHECK(group == nullptr || group->rank() == 0, "the generation service runs on rank 0");
  if (own_thread) worker_ = std::thread([this] { Run(); });
}

GenerationService::~GenerationService() {
  Shutdown();
  if (worker_.joinable()) worker_.join();
}

void GenerationService::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  queued_.notify_all();
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

void GenerationService::Run() {
  // The generator is used by this thread alone; the lock guards the queue, jobs and stats.
  std::vector<std::pair<Job*, size_t>> owner(gen_->max_sequences());  // slot -> job, index
  StepMessage step;  // for the followers: what changed since the last pass
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty() || gen_->active() > 0; });
      if (queue_.empty() && gen_->active() == 0) break;  // stopping, and nothing left
      while (!queue_.empty() && gen_->free_slots() > 0) {
        Job* job = queue_.front();
        const GenerationRequest& r = (*job->requests)[job->next];
        auto slot = gen_->Admit(r);
        EE_CHECK(slot.ok(), "admitting a validated request failed: ", slot.status().message());
        owner[*slot] = {job, job->next};
        if (group_ != nullptr) step.admit.emplace_back(*slot, r);
        if (++job->next == job->requests->size()) queue_.pop_front();
      }
    }
    if (group_ != nullptr) {
      Exchange(group_, &step);
      step = StepMessage();
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
        if (f.result.finish == FinishReason::kStop) step.retire.push_back(f.slot);
        job->results[index] = std::move(f.result);
        job->remaining--;
      }
    }
    if (!finished.empty()) done_.notify_all();
  }
  if (group_ != nullptr) {
    step.stop = true;
    Exchange(group_, &step);
  }
}

void GenerationService::Follow(Generator* generator, Communicator* group) {
  EE_CHECK(group->rank() != 0, "rank 0 leads; the others follow");
  for (;;) {
    const StepMessage m = Exchange(group, nullptr);
    // A stop rule (on the leader) ended these in the last pass; the follower's copies run on.
    for (int slot : m.retire) generator->Retire(slot);
    if (m.stop) return;
    for (const auto& [slot, request] : m.admit) {
      auto mine = generator->Admit(request);
      EE_CHECK(mine.ok() && *mine == slot, "a follower admitted into slot ", mine.ok() ? *mine : -1,
               ", the leader into ", slot);
    }
    generator->Advance();
  }
}

}  // namespace eellm
