// Generator: requests on sequence slots (continuous batching). Admission into a slot and KV
// pages, the checks that name a bad request, the passes of Advance and what they emit per
// sequence (sampling, stop rules), and whole batches of requests. The passes themselves are in
// generator.cc.
#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "models/generator.h"

namespace eellm {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

double GenerationResult::AverageLayers() const {
  if (depth.empty()) return 0;
  double s = 0;
  for (int d : depth) s += d;
  return s / depth.size();
}

double GenerationResult::DecodeTokensPerSecond() const {
  // The first token comes from the prefill; the rest from decode steps.
  return decode_seconds > 0 ? (tokens.size() > 1 ? tokens.size() - 1 : 0) / decode_seconds : 0;
}

int Generator::RequestTokens(const GenerationRequest& r) {
  return static_cast<int>(r.prompt.size()) + r.max_new_tokens;
}

int Generator::kv_tokens_in_use() const {
  if (kv_by_request_) return (kv_pages_ - page_pool_.free()) * kKvPageTokens;  // shared pages once
  int n = 0;
  for (const Sequence& q : seqs_) n += q.busy ? q.table.tokens() : 0;
  return n;
}

int Generator::WatermarkPages() const { return active() > 0 ? kv_pages_ / 100 : 0; }

bool Generator::CanAdmit(const GenerationRequest& request) const {
  if (free_slots() == 0) return false;
  if (!kv_by_request_) return true;
  const int free = page_pool_.free();
  const bool scoring = request.prompt_logprobs;
  if (!kv_on_demand()) {
    return PagesToStart(request, request.prompt, RequestTokens(request), scoring) <= free;
  }
  for (const Sequence& q : seqs_) {
    if (q.busy && q.preempted) return false;  // they resume first
  }
  const int prompt = static_cast<int>(request.prompt.size());
  return PagesToStart(request, request.prompt, prompt, scoring) + WatermarkPages() <= free;
}

void Generator::Preempt(Sequence& q) {
  // It resumes with a prefill of everything it holds: its prompt and the tokens it generated
  // (the newest, not yet in the cache, included). A speculative round's drafts are dropped.
  q.next = q.request.prompt;
  q.next.insert(q.next.end(), q.result.tokens.begin(), q.result.tokens.end());
  if (!q.prefilled) {  // a prompt being scored in chunks is scored again from its start
    q.result.prompt_logprobs.clear();
    q.result.prompt_top.clear();
  }
  ReleaseKv(q);
  q.preempted = true;
  q.drafts.clear();
  q.draft_dist.clear();
  q.checking = true;
  q.prefill = true;
  ++preemptions_;
}

void Generator::PlanKv() {
  if (!kv_on_demand()) return;
  auto need = [&](const Sequence& q) {
    const int len = q.len + static_cast<int>(q.next.size());
    return std::max(0, PagesFor(len) - static_cast<int>(q.pages.size()));
  };
  for (;;) {
    int total = 0;
    Sequence* latest = nullptr;
    for (Sequence& q : seqs_) {
      if (!q.busy || q.preempted) continue;
      total += need(q);
      if (latest == nullptr || q.admitted_at > latest->admitted_at) latest = &q;
    }
    if (total <= page_pool_.free() || latest == nullptr) break;
    Preempt(*latest);
  }
  for (Sequence& q : seqs_) {
    if (q.busy && !q.preempted) {
      EE_CHECK(GrowKv(q, q.len + static_cast<int>(q.next.size())), "no KV pages");
    }
  }
  for (;;) {  // the preempted, oldest first, while their pages are free
    Sequence* oldest = nullptr;
    for (Sequence& q : seqs_) {
      if (q.busy && q.preempted && (oldest == nullptr || q.admitted_at < oldest->admitted_at)) {
        oldest = &q;
      }
    }
    if (oldest == nullptr) break;
    const int n = static_cast<int>(oldest->next.size());
    const bool scoring = oldest->request.prompt_logprobs && !oldest->prefilled;
    if (PagesToStart(oldest->request, oldest->next, n, scoring) > page_pool_.free()) break;
    UseCachedPrefix(*oldest);
    EE_CHECK(GrowKv(*oldest, n), "no KV pages");
    oldest->preempted = false;
  }
}

void Generator::ReleaseKv(Sequence& q) {
  if (!kv_by_request_) return;
  // Stamped with the passes run, which tensor-parallel ranks agree on; deeper pages are
  // forgotten first (a prefix is worth more than a tail).
  for (size_t i = 0; i < q.pages.size(); ++i) {
    page_pool_.Release(q.pages[i], passes_, static_cast<int>(i));
  }
  q.pages.clear();
  q.registered_pages = 0;
  SyncPageTable(q, 0);
  q.len = q.pending_start = 0;  // nothing left to complete (FinishPending) in pages not its own
}

absl::Status Generator::Validate(const GenerationRequest& r) const {
  const ModelConfig& c = model_->config();
  if (r.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (r.max_new_tokens < (r.prompt_logprobs ? 0 : 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_new_tokens must be >= 1 (0 only to score the prompt), got ", r.max_new_tokens));
  }
  if (r.top_logprobs < 0 || r.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", r.top_logprobs));
  }
  const int64_t need = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
  if (need > capacity_) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", r.prompt.size(), " tokens) + max_new_tokens (", r.max_new_tokens,
                     ") = ", need, " exceeds the context length ", capacity_));
  }
  if (kv_by_request_ && need > kv_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", r.prompt.size(), " tokens) + max_new_tokens (", r.max_new_tokens,
                     ") = ", need, " exceeds the KV cache's ", kv_tokens(), " tokens"));
  }
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= token_limit_)
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", t, " is outside the vocabulary [0, ", token_limit_, ")"));
  }
  const SamplingParams& sp = r.sampling;
  if (!(sp.temperature >= 0 && std::isfinite(sp.temperature))) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0 and finite, got ", sp.temperature));
  }
  if (sp.top_k < 0)
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", sp.top_k));
  if (!(sp.top_p > 0 && sp.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", sp.top_p));
  }
  if (!(r.early_exit.threshold > 0 && std::isfinite(r.early_exit.threshold))) {
    return absl::InvalidArgumentError(
        absl::StrCat("the early-exit threshold must be > 0, got ", r.early_exit.threshold));
  }
  for (int layer : r.early_exit.exit_layers) {
    bool known = false;
    for (const ExitConfig& x : c.exits) known |= x.layer == layer;
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("exit layer ", layer, " is not the layer of an exit in this model"));
    }
  }
  return ValidateSpeculative(r);
}

absl::Status Generator::ValidateAll(const std::vector<GenerationRequest>& requests) const {
  if (requests.empty()) return absl::InvalidArgumentError("no prompts");
  for (size_t i = 0; i < requests.size(); ++i) {
    absl::Status s = Validate(requests[i]);
    if (!s.ok()) {
      return requests.size() == 1
                 ? s
                 : absl::InvalidArgumentError(absl::StrCat("prompt ", i, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int> Generator::Admit(GenerationRequest request, int slot) {
  RETURN_IF_ERROR(Validate(request));
  EE_CHECK(slot < max_sequences(), "slot ", slot, " of ", max_sequences());
  // The tokens whose pages admission takes: the prompt's (more come as the sequence grows), or
  // with pages reserved per request, prompt + max_new_tokens.
  const int tokens =
      kv_on_demand() ? static_cast<int>(request.prompt.size()) : RequestTokens(request);
  if (kv_by_request_ &&
      PagesToStart(request, request.prompt, tokens, request.prompt_logprobs) > page_pool_.free()) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV cache has no room for ", tokens,
                                                     " tokens (", page_pool_.free() * kKvPageTokens,
                                                     " of ", kv_tokens(), " free)"));
  }
  for (size_t s = 0; s < seqs_.size(); ++s) {
    Sequence& q = seqs_[s];
    if (q.busy || (slot >= 0 && static_cast<int>(s) != slot)) continue;
    q.admitted_at = admissions_++;
    q.preempted = false;
    q.len = q.pending_start = 0;
    q.busy = true;
    q.prefilled = false;
    q.rng.Seed(request.sampling.seed);
    q.result = GenerationResult();
    q.next = request.prompt;
    q.round_drafts = 0;
    q.drafts.clear();
    q.draft_dist.clear();
    q.checking = true;  // the prefill: a full pass
    q.prefill = true;
    q.request = std::move(request);
    if (kv_by_request_) {
      UseCachedPrefix(q);
      EE_CHECK(GrowKv(q, tokens), "no KV pages");
    }
    q.timer.Reset();
    return static_cast<int>(s);
  }
  return absl::ResourceExhaustedError(
      slot >= 0 ? absl::StrCat("sequence slot ", slot, " is taken")
                : absl::StrCat("all ", seqs_.size(), " sequence slots are taken"));
}

GenerationResult Generator::Retire(int slot) {
  Sequence& q = seqs_.at(slot);
  if (q.busy) ReleaseKv(q);
  q.busy = false;
  q.next.clear();
  q.request = GenerationRequest();
  q.result.finish = FinishReason::kCancelled;
  return std::move(q.result);
}

int Generator::active() const {
  int n = 0;
  for (const Sequence& q : seqs_) n += q.busy;
  return n;
}

std::vector<Generator::Finished> Generator::Advance(
    const std::function<void(int, int32_t)>& on_token) {
  std::vector<Finished> finished;
  std::vector<std::vector<int32_t>> ids(seqs_.size());
  std::vector<EarlyExitParams> ee(seqs_.size());
  std::vector<bool> check(seqs_.size()), partial(seqs_.size());
  PlanKv();
  // Chunked prefill: the prompt rows this pass may take, to the prefilling sequences in
  // admission order.
  std::vector<int> order;
  for (size_t s = 0; s < seqs_.size(); ++s) order.push_back(static_cast<int>(s));
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return seqs_[a].admitted_at < seqs_[b].admitted_at; });
  int budget = prefill_chunk_ > 0 ? prefill_chunk_ : std::numeric_limits<int>::max();
  bool any = false;
  for (int s : order) {
    Sequence& q = seqs_[s];
    if (!q.busy || q.preempted) continue;
    const bool prefill = q.prefill;
    if (prefill) {  // its prompt (or a chunk of it); after the last chunk no longer a prefill
      if (budget == 0) continue;  // its prompt waits for the next pass
      const int n = static_cast<int>(q.next.size());
      partial[s] = n > budget;
      ids[s] = TakeNext(s, budget);
      budget -= std::min(n, budget);
    } else {
      ids[s] = TakeNext(s);
    }
    ee[s] = q.speculative() ? SpeculativePassExits(q) : q.request.early_exit;
    // A check scores the round's rows; a prefill (also a preempted sequence's) its newest.
    check[s] = q.speculative() && q.checking && !prefill;
    any = true;
  }
  if (!any) return finished;
  const std::vector<StepResult> r = Pass(ids, ee, check, partial);
  for (size_t s = 0; s < seqs_.size(); ++s) {
    Finished f;
    if (ids[s].empty()) continue;
    // Its whole pages are registered before a finished sequence releases them.
    if (prefix_caching_) RegisterPages(seqs_[s]);
    if (partial[s]) {  // no token yet
      KeepPromptScores(static_cast<int>(s), r[s]);
      continue;
    }
    if (Accept(static_cast<int>(s), r[s], on_token, &f)) finished.push_back(std::move(f));
  }
  return finished;
}

void Generator::KeepPromptScores(int slot, const StepResult& r) {
  GenerationResult& g = seqs_.at(slot).result;
  g.prompt_logprobs.insert(g.prompt_logprobs.end(), r.prompt_logprobs.begin(),
                           r.prompt_logprobs.end());
  g.prompt_top.insert(g.prompt_top.end(), r.prompt_top.begin(), r.prompt_top.end());
}

std::vector<int32_t> Generator::TakeNext(int slot, int most) {
  Sequence& q = seqs_.at(slot);
  if (static_cast<int>(q.next.size()) > most) {  // a chunk: still a prefill after it
    std::vector<int32_t> ids(q.next.begin(), q.next.begin() + most);
    q.next.erase(q.next.begin(), q.next.begin() + most);
    return ids;
  }
  std::vector<int32_t> ids = std::move(q.next);
  q.next.clear();
  q.prefill = false;
  return ids;
}

bool Generator::Accept(int slot, const StepResult& r,
                       const std::function<void(int, int32_t)>& on_token, Finished* finished) {
  Sequence& q = seqs_.at(slot);
  EE_CHECK(q.busy && !r.logits.empty(), "Accept: slot ", slot, " has no running sequence");
  if (!q.prefilled) {
    q.result.prefill_seconds = q.timer.Seconds();
    q.timer.Reset();
    q.prefilled = true;
    KeepPromptScores(slot, r);  // the last chunk's (earlier chunks' were kept as they came)
    if (q.request.max_new_tokens == 0) {  // the prompt was to be scored only
      Finish(slot, FinishReason::kLength, finished);
      return true;
    }
  }
  if (q.speculative()) return AcceptSpeculative(slot, r, on_token, finished);
  std::vector<float> scratch = r.logits;
  const int32_t tok = SampleToken(scratch, q.request.sampling, q.rng);
  if (Emit(slot, tok, r.exit_index, r.depth, r.logits.data(), on_token, finished)) return true;
  q.next = {tok};
  return false;
}

bool Generator::Emit(int slot, int32_t tok, int exit_index, int depth, const float* logits,
                     const std::function<void(int, int32_t)>& on_token, Finished* finished) {
  Sequence& q = seqs_[slot];
  const GenerationRequest& req = q.request;
  GenerationResult& g = q.result;
  const int vocab = model_->config().vocab_size;
  g.tokens.push_back(tok);
  g.exit_index.push_back(exit_index);
  g.depth.push_back(depth);
  g.logprobs.push_back(LogProbability(logits, vocab, tok));
  if (req.top_logprobs > 0) g.top.push_back(TopLogProbabilities(logits, vocab, req.top_logprobs));
  if (on_token) on_token(slot, tok);
  if (tok == req.eos_id) {
    Finish(slot, FinishReason::kEos, finished);
  } else if (req.stop && req.stop(g.tokens)) {
    Finish(slot, FinishReason::kStop, finished);
  } else if (static_cast<int>(g.tokens.size()) == req.max_new_tokens) {
    Finish(slot, FinishReason::kLength, finished);
  } else {
    return false;
  }
  return true;
}

void Generator::Finish(int slot, FinishReason why, Finished* finished) {
  Sequence& q = seqs_[slot];
  GenerationResult& g = q.result;
  g.finish = why;
  g.decode_seconds = q.timer.Seconds();
  q.busy = false;
  ReleaseKv(q);
  q.request = GenerationRequest();
  *finished = {slot, std::move(g)};
}

absl::StatusOr<std::vector<GenerationResult>> Generator::GenerateBatch(
    const std::vector<GenerationRequest>& requests,
    const std::function<void(int, int32_t)>& on_token) {
  RETURN_IF_ERROR(ValidateBatch(*this, requests));
  Reset();
  return GenerateAll(*this, requests, on_token);
}

absl::Status ValidateBatch(const SequenceBatcher& batcher,
                           const std::vector<GenerationRequest>& requests) {
  if (requests.size() > static_cast<size_t>(batcher.max_sequences())) {
    return absl::InvalidArgumentError(absl::StrCat(requests.size(),
                                                   " prompts, but this generator holds at most ",
                                                   batcher.max_sequences(), " sequences"));
  }
  return batcher.ValidateAll(requests);
}

std::vector<GenerationResult> GenerateAll(SequenceBatcher& batcher,
                                          const std::vector<GenerationRequest>& requests,
                                          const std::function<void(int, int32_t)>& on_token) {
  EE_CHECK(batcher.active() == 0, "GenerateAll while sequences run");
  const int n = static_cast<int>(requests.size());
  std::vector<GenerationResult> results(n);
  std::vector<int> index(batcher.max_sequences(), -1);  // slot -> request
  auto each = [&](int slot, int32_t token) {
    if (on_token) on_token(index[slot], token);
  };
  for (int next = 0; next < n || batcher.active() > 0;) {
    while (next < n && batcher.CanAdmit(requests[next])) {
      auto slot = batcher.Admit(requests[next]);
      EE_CHECK(slot.ok(), "admitting a valid request failed: ", slot.status().message());
      index[*slot] = next++;
    }
    EE_CHECK(next == n || batcher.active() > 0, "request ", next,
             " cannot be admitted into an idle generator (invalid?)");
    for (FinishedSequence& f : batcher.Advance(each)) {
      results[index[f.slot]] = std::move(f.result);
    }
  }
  return results;
}

absl::StatusOr<GenerationResult> Generator::Generate(const std::vector<int32_t>& prompt,
                                                     int max_new_tokens, int eos_id,
                                                     const SamplingParams& sampling,
                                                     const EarlyExitParams& ee,
                                                     const std::function<void(int32_t)>& on_token) {
  GenerationRequest q;
  q.prompt = prompt;
  q.max_new_tokens = max_new_tokens;
  q.eos_id = eos_id;
  q.sampling = sampling;
  q.early_exit = ee;
  std::function<void(int, int32_t)> each;
  if (on_token) each = [&](int, int32_t t) { on_token(t); };
  auto r = GenerateBatch({q}, each);
  if (!r.ok()) return r.status();
  return std::move((*r)[0]);
}

}  // namespace eellm
