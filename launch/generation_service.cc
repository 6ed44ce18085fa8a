#include "launch/generation_service.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

#include "engine/core/status.h"
#include "nlohmann/json.hpp"
#include "parallel/comm/mpi_runtime.h"

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

// Floats travel as their bits, so that every value (and the sampling that uses it) is
// reproduced exactly.
uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

std::string Encode(const StepMessage& m) {
  json admit = json::array();
  for (const auto& [slot, r] : m.admit) {
    admit.push_back({{"slot", slot},
                     {"prompt", r.prompt},
                     {"max_new_tokens", r.max_new_tokens},
                     {"eos_id", r.eos_id},
                     {"temperature", Bits(r.sampling.temperature)},
                     {"top_k", r.sampling.top_k},
                     {"top_p", Bits(r.sampling.top_p)},
                     {"seed", r.sampling.seed},
                     {"threshold", Bits(r.early_exit.threshold)},
                     {"exit_layers", r.early_exit.exit_layers},
                     {"draft_layer", r.speculative.exit_layer},
                     {"draft_tokens", r.speculative.draft_tokens},
                     {"draft_confidence", Bits(r.speculative.min_confidence)},
                     {"prompt_logprobs", r.prompt_logprobs},
                     {"top_logprobs", r.top_logprobs}});
  }
  return json{{"stop", m.stop}, {"retire", m.retire}, {"admit", admit}}.dump();
}

StepMessage Decode(const std::string& text) {
  StepMessage m;
  try {
    const json j = json::parse(text);
    m.stop = j.at("stop").get<bool>();
    m.retire = j.at("retire").get<std::vector<int>>();
    for (const json& a : j.at("admit")) {
      GenerationRequest r;
      r.prompt = a.at("prompt").get<std::vector<int32_t>>();
      r.max_new_tokens = a.at("max_new_tokens").get<int>();
      r.eos_id = a.at("eos_id").get<int>();
      r.sampling.temperature = FromBits(a.at("temperature").get<uint32_t>());
      r.sampling.top_k = a.at("top_k").get<int>();
      r.sampling.top_p = FromBits(a.at("top_p").get<uint32_t>());
      r.sampling.seed = a.at("seed").get<uint64_t>();
      r.early_exit.threshold = FromBits(a.at("threshold").get<uint32_t>());
      r.early_exit.exit_layers = a.at("exit_layers").get<std::vector<int>>();
      r.speculative.exit_layer = a.at("draft_layer").get<int>();
      r.speculative.draft_tokens = a.at("draft_tokens").get<int>();
      r.speculative.min_confidence = FromBits(a.at("draft_confidence").get<uint32_t>());
      r.prompt_logprobs = a.at("prompt_logprobs").get<bool>();
      r.top_logprobs = a.at("top_logprobs").get<int>();
      m.admit.emplace_back(a.at("slot").get<int>(), std::move(r));
    }
  } catch (const json::exception& e) {
    AbortAllRanks(std::string("a follower cannot read the leader's step message: ") + e.what());
  }
  return m;
}

constexpr int kSizeTag = 9101, kTextTag = 9102;

// The leader sends `m` to every other rank of `group`.
void Send(Communicator* group, const StepMessage& m) {
  const std::string text = Encode(m);
  const int64_t size = static_cast<int64_t>(text.size());
  for (int r = 1; r < group->size(); ++r) {
    group->Send(&size, sizeof(size), r, kSizeTag);
    group->Send(text.data(), text.size(), r, kTextTag);
  }
}

// A follower receives the leader's next message. An idle follower waits without spinning: it
// polls the receive, sleeping up to 1 ms between polls once a few thousand polls found nothing.
StepMessage Receive(Communicator* group) {
  int64_t size = 0;
  std::unique_ptr<Request> pending = group->IRecv(&size, sizeof(size), 0, kSizeTag);
  for (int polls = 0; !pending->Test(); ++polls) {
    if (polls > 2000)
      std::this_thread::sleep_for(std::chrono::microseconds(std::min(polls - 2000, 1000)));
  }
  std::string text(size, '\0');
  group->Recv(text.data(), text.size(), 0, kTextTag);
  return Decode(text);
}

}  // namespace

GenerationService::GenerationService(SequenceBatcher* generator, Communicator* group,
                                     bool own_thread)
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

void GenerationService::Histogram::Observe(double seconds) {
  size_t b = 0;
  while (b < kBounds.size() && seconds > kBounds[b]) ++b;
  ++counts[b];
  sum += seconds;
  ++count;
}

void GenerationService::Count(const GenerationResult& r) {
  stats_.tokens += static_cast<int64_t>(r.tokens.size());
  for (int e : r.exit_index) ++stats_.tokens_by_head[e];
  stats_.drafted += r.drafted;
  stats_.accepted += r.accepted;
}

void GenerationService::UpdateGauges() {
  stats_.kv_tokens_in_use = gen_->kv_tokens_in_use();
  stats_.running = gen_->active();
  stats_.waiting = 0;
  for (const Job* job : queue_) {
    stats_.waiting += static_cast<int>(job->requests->size() - job->next);
  }
}

GenerationService::Stats GenerationService::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

absl::StatusOr<std::vector<GenerationResult>> GenerationService::Generate(
    const std::vector<GenerationRequest>& requests,
    const std::function<void(int, int32_t)>& on_token, const std::atomic<bool>* cancelled) {
  RETURN_IF_ERROR(gen_->ValidateAll(requests));
  Job job;
  job.requests = &requests;
  job.on_token = on_token ? &on_token : nullptr;
  job.cancelled = cancelled;
  job.results.resize(requests.size());
  job.remaining = requests.size();
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("the generation service is stopping");
  queue_.push_back(&job);
  queued_.notify_one();
  done_.wait(lock, [&] { return job.remaining == 0; });
  stats_.requests++;
  stats_.request_seconds.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - job.start).count());
  return std::move(job.results);
}

void GenerationService::Run() {
  // The generator is used by this thread alone; the lock guards the queue, jobs and stats.
  std::vector<std::pair<Job*, size_t>> owner(gen_->max_sequences());  // slot -> job, index
  std::vector<char> awaits_first(gen_->max_sequences());              // slot: no token yet
  std::vector<std::chrono::steady_clock::time_point> last_token(gen_->max_sequences());
  StepMessage step;  // for the followers: what changed since the last pass
  auto on_token = [&](int slot, int32_t token) {
    const auto& [job, index] = owner[slot];
    const auto now = std::chrono::steady_clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (awaits_first[slot]) {
        awaits_first[slot] = 0;
        stats_.first_token_seconds.Observe(std::chrono::duration<double>(now - job->start).count());
      } else {
        stats_.inter_token_seconds.Observe(
            std::chrono::duration<double>(now - last_token[slot]).count());
      }
    }
    last_token[slot] = now;
    if (job->on_token != nullptr) (*job->on_token)(static_cast<int>(index), token);
  };
  for (;;) {
    bool cancelled = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty() || gen_->active() > 0; });
      // Cancelled requests: their running sequences end now (the followers' copies too), and
      // the rest of them is not admitted.
      for (int slot = 0; slot < gen_->max_sequences(); ++slot) {
        Job* job = owner[slot].first;
        if (job == nullptr || job->cancelled == nullptr || !*job->cancelled) continue;
        job->results[owner[slot].second] = gen_->Retire(slot);
        stats_.cancelled++;
        Count(job->results[owner[slot].second]);
        job->remaining--;
        owner[slot] = {nullptr, 0};
        step.retire.push_back(slot);
        cancelled = true;
      }
      for (auto it = queue_.begin(); it != queue_.end();) {
        Job* job = *it;
        if (job->cancelled == nullptr || !*job->cancelled) {
          ++it;
          continue;
        }
        for (; job->next < job->requests->size(); ++job->next) {
          job->results[job->next].finish = FinishReason::kCancelled;
          stats_.cancelled++;
          job->remaining--;
        }
        it = queue_.erase(it);
        cancelled = true;
      }
      if (queue_.empty() && gen_->active() == 0) {
        UpdateGauges();  // cancellations may have emptied the generator
        if (cancelled) done_.notify_all();
        if (stopping_) break;  // nothing left
        continue;
      }
      // In arrival order, while the next one finds a slot and KV room (a request waits for the
      // sequences before it rather than being overtaken). With prefix caching, a prompt admitted
      // again in the same round (the copies of a request's "n", or the same prompt twice) waits
      // for the next pass: the first copy's pass registers its pages, which the others then
      // hold instead of prefilling them again.
      std::vector<const std::vector<int32_t>*> admitted;  // this round's prompts
      while (!queue_.empty() && gen_->CanAdmit((*queue_.front()->requests)[queue_.front()->next])) {
        Job* job = queue_.front();
        const GenerationRequest& r = (*job->requests)[job->next];
        if (gen_->prefix_caching() &&
            r.prompt.size() > static_cast<size_t>(Generator::kKvPageTokens) &&
            std::any_of(admitted.begin(), admitted.end(),
                        [&](const std::vector<int32_t>* p) { return *p == r.prompt; })) {
          break;
        }
        admitted.push_back(&r.prompt);
        auto slot = gen_->Admit(r);
        EE_CHECK(slot.ok(), "admitting a validated request failed: ", slot.status().message());
        owner[*slot] = {job, job->next};
        awaits_first[*slot] = 1;
        stats_.prompt_tokens += static_cast<int64_t>(r.prompt.size());
        if (group_ != nullptr) step.admit.emplace_back(*slot, r);
        if (++job->next == job->requests->size()) queue_.pop_front();
      }
    }
    if (group_ != nullptr) {
      Send(group_, step);
      step = StepMessage();
    }
    if (cancelled) done_.notify_all();
    std::vector<FinishedSequence> finished = gen_->Advance(on_token);
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Passes the generator ran (a pipeline's Advance may only wait for its deeper stages).
      stats_.steps = gen_->passes();
      stats_.largest_batch = gen_->largest_pass();
      stats_.preemptions = gen_->preemptions();
      stats_.prefix_cached_tokens = gen_->prefix_cached_tokens();
      for (FinishedSequence& f : finished) {
        auto [job, index] = owner[f.slot];
        stats_.sequences++;
        Count(f.result);
        if (f.result.finish == FinishReason::kStop) step.retire.push_back(f.slot);
        job->results[index] = std::move(f.result);
        job->remaining--;
        owner[f.slot] = {nullptr, 0};
      }
      UpdateGauges();
    }
    if (!finished.empty()) done_.notify_all();
  }
  if (group_ != nullptr) {
    step.stop = true;
    Send(group_, step);
  }
}

void GenerationService::Follow(Generator* generator, Communicator* group) {
  EE_CHECK(group->rank() != 0, "rank 0 leads; the others follow");
  for (;;) {
    const StepMessage m = Receive(group);
    // A stop rule (on the leader) ended these in the last pass; the follower's copies run on.
    for (int slot : m.retire) generator->Retire(slot);  // a no-op on a slot already free
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
