// Generator: self-speculative decoding (see models/speculative.h). A round of a sequence: its
// newest token and then each draft run to the drafting exit, which always fires, and the exit
// samples the next draft (their rows stay pending below the deeper layers); after round_drafts
// drafts, one full pass carries the pending rows and the last draft through the deeper layers
// and the final head scores each row. Row i predicts the token after the round's i-th row: it
// checks draft i, and the first rejected draft is replaced by the full model's token (or, when
// all are kept, the last row gives one more). The cache then drops the rows after the last kept
// token: every kept row has run through every layer, so the sequence is simply shortened.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "models/generator.h"

namespace eellm {

absl::Status Generator::ValidateSpeculative(const GenerationRequest& r) const {
  const SpeculativeParams& sp = r.speculative;
  if (!sp.enabled()) {
    if (sp.exit_layer < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("the drafting exit's layer must be >= 0 (0: off), got ", sp.exit_layer));
    }
    return absl::OkStatus();
  }
  if (!model_->is_first_stage() || !model_->is_last_stage()) {
    return absl::InvalidArgumentError(
        "speculative decoding needs the whole model in one pipeline stage (run it with --pp=1)");
  }
  if (r.early_exit.threshold < 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "speculative decoding emits the full model's tokens; it does not combine with early exit "
        "(threshold ",
        r.early_exit.threshold, "): set the threshold to 1"));
  }
  if (!(sp.min_confidence >= 0 && sp.min_confidence <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the drafts' confidence floor must be in [0, 1], got ", sp.min_confidence));
  }
  if (sp.draft_tokens < 1 || sp.draft_tokens > kMaxDraftTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft tokens must be in [1, ", kMaxDraftTokens, "], got ", sp.draft_tokens));
  }
  for (const ExitConfig& x : model_->config().exits) {
    if (x.layer == sp.exit_layer) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("the drafting exit's layer ", sp.exit_layer,
                                                 " is not the layer of an exit in this model"));
}

EarlyExitParams Generator::SpeculativePassExits(const Sequence& q) const {
  EarlyExitParams ee;  // threshold 1: no exit
  if (!q.checking) {
    ee.threshold = 0.0f;  // every max probability reaches it
    ee.exit_layers = {q.request.speculative.exit_layer};
  }
  return ee;
}

bool Generator::AcceptSpeculative(int slot, const StepResult& r,
                                  const std::function<void(int, int32_t)>& on_token,
                                  Finished* finished) {
  Sequence& q = seqs_[slot];
  const int vocab = model_->config().vocab_size;
  const SamplingParams sampling = q.request.sampling;
  // Greedy: each head's top token (the first largest logit, as SampleToken takes), without
  // distributions; VerifyDraft would keep a draft iff it is the full model's top token too.
  const bool greedy = sampling.temperature <= 0.0f;
  auto top = [vocab](const float* logits) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  };
  if (!q.checking) {  // a draft
    EE_CHECK(r.exit_index >= 0 && r.rows == 1, "slot ", slot, ": the drafting exit did not fire");
    if (greedy) {
      q.drafts.push_back(top(r.logits.data()));
    } else {
      q.draft_dist.push_back(TokenDistribution(r.logits.data(), vocab, sampling));
      q.drafts.push_back(SampleFrom(q.draft_dist.back(), q.rng));
    }
    q.next = {q.drafts.back()};
    const float floor = q.request.speculative.min_confidence;
    q.checking = static_cast<int>(q.drafts.size()) == q.round_drafts ||
                 (floor > 0 && MaxProbability(r.logits.data(), vocab, r.temperature) < floor);
    return false;
  }
  // The check (or the prefill, which has no drafts): the last n + 1 rows score the round.
  const int n = static_cast<int>(q.drafts.size());
  EE_CHECK(r.exit_index < 0 && r.rows == n + 1, "slot ", slot, ": ", r.rows,
           " rows of the final head check ", n, " drafts");
  q.result.drafted += n;
  ++q.result.checks;
  int kept = 0;
  int32_t tok = 0;
  for (int i = 0; i <= n; ++i) {
    const float* row = r.logits.data() + static_cast<size_t>(i) * vocab;
    bool more = false;
    if (greedy) {
      tok = top(row);
      more = i < n && tok == q.drafts[i];
      kept += more;
      q.result.accepted += more;
    } else {
      const std::vector<double> p = TokenDistribution(row, vocab, sampling);
      if (i < n) {
        const DraftVerdict v = VerifyDraft(p, q.draft_dist[i], q.drafts[i], q.rng);
        tok = v.token;
        more = v.accepted;
        kept += v.accepted;
        q.result.accepted += v.accepted;
      } else {
        tok = SampleFrom(p, q.rng);
      }
    }
    if (Emit(slot, tok, -1, model_->config().num_layers, row, on_token, finished)) return true;
    if (!more) break;
  }
  // Rows after the last kept draft hold rejected tokens: drop them. Every row left has run
  // through every layer, so nothing pends.
  q.len = q.pending_start = q.len - (n - kept);
  q.drafts.clear();
  q.draft_dist.clear();
  q.next = {tok};
  // The next round emits at most round_drafts + 1 tokens, within max_new_tokens (so its rows
  // stay within the sequence's KV room).
  const int left = q.request.max_new_tokens - static_cast<int>(q.result.tokens.size());
  q.round_drafts = std::min(q.request.speculative.draft_tokens, left - 1);
  q.checking = q.round_drafts == 0;
  return false;
}

}  // namespace eellm
