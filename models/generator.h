// Early-exit generation for a batch of sequences, each with its own KV cache: prefill + decode,
// sampling, and EE-LLM's KV recomputation. The exits are checked in depth order on each
// sequence's newest token; the first whose max probability (after its temperature) reaches that
// sequence's threshold wins. A token that exits at depth D leaves layers D+1.. without its K/V;
// those rows stay "pending" (their hidden state at their depth is kept) and the sequence's next
// forward pass carries them through the missing layers together with the new token. Pending
// depths never increase with position, so the rows a sequence needs at each layer form a suffix.
//
// Tensor parallelism: every rank of the group runs the same calls on its shard of the model; the
// heads' vocabulary shards are gathered, so all ranks take the same decisions.
//
// Batching: one forward pass serves every sequence with work. At each layer the rows all
// sequences need are packed together; norms, GEMMs and MLPs run once over all of them, and
// attention runs per sequence on its own cache (KvSegment). Each sequence exits on its own: one
// that exits at depth D simply has no rows in the deeper layers of that pass. A sequence's
// tokens are those it would get alone (same sampling seed), up to floating-point rounding of
// the batched GEMMs.
//
// Self-speculative decoding (a request's `speculative`; models/generator_speculative.cc): the
// sequence's passes alternate between drafting (its newest token runs to the drafting exit,
// which always fires) and checking (the drafted rows, left pending, run through the deeper
// layers together with the last draft, and the final head scores every row of the round). The
// tokens the check rejects are dropped from the cache by shortening the sequence.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/rng.h"
#include "engine/core/timer.h"
#include "models/kv_page_pool.h"
#include "models/layers.h"
#include "models/sampler.h"
#include "models/speculative.h"
#include "models/transformer.h"

namespace eellm {

struct EarlyExitParams {
  float threshold = 1.0f;        // >= 1 disables early exit (full-model output)
  std::vector<int> exit_layers;  // layer numbers of exits allowed to fire; empty = all
};

struct StepResult {
  int exit_index = -1;        // exit that fired, -1 for the final head
  int depth = 0;              // layers computed for the newest token
  std::vector<float> logits;  // [rows, vocab] of the head that produced the token (before
                              // temperature): the newest row's, or on a pass that checks a
                              // sequence's drafts the final head's for each of its rows
  int rows = 1;
  float temperature = 1.0f;  // that head's temperature
  // On a prefill that scores the prompt: per prompt token after the first, its log-probability
  // under the final head, and its position's most likely tokens.
  std::vector<float> prompt_logprobs;
  std::vector<TopTokens> prompt_top;
};

enum class FinishReason { kLength, kEos, kStop, kCancelled };
const char* FinishReasonName(FinishReason r);  // "length", "eos", "stop", "cancelled"

inline constexpr int kMaxTopLogprobs = 20;

// One sequence to generate.
struct GenerationRequest {
  std::vector<int32_t> prompt;
  int max_new_tokens = 64;
  int eos_id = -1;  // -1: none
  SamplingParams sampling;
  EarlyExitParams early_exit;
  SpeculativeParams speculative;  // instead of early_exit: an exit drafts, the full model checks
  // Also score the prompt (GenerationResult::prompt_logprobs); max_new_tokens may then be 0, to
  // score it only. The prefill then checks no exit (every prompt row runs every layer anyway):
  // the final head decides the first token.
  bool prompt_logprobs = false;
  int top_logprobs = 0;  // per reported position, this many most likely tokens (0 to 20)
  // Called with the tokens generated so far after each token; true ends the sequence there
  // (e.g. a stop string was produced). May be null.
  std::function<bool(const std::vector<int32_t>&)> stop;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated tokens (prompt excluded)
  std::vector<int> exit_index;  // per generated token: exit that produced it, -1 final
  std::vector<int> depth;       // per generated token: layers computed
  std::vector<float> logprobs;  // per generated token: log softmax of its head's logits
  // Speculative decoding: drafts checked, drafts kept, and full-model passes (the prefill and
  // each round's check).
  int drafted = 0, accepted = 0, checks = 0;
  // With prompt_logprobs: per prompt token after the first, its log-probability under the final
  // head given the tokens before it. With top_logprobs: the most likely tokens at each of those
  // positions, and at each generated token's (from the head that produced it).
  std::vector<float> prompt_logprobs;
  std::vector<TopTokens> prompt_top, top;
  // Prompt tokens whose K/V came from the prefix cache instead of the prefill
  // (Generator::EnablePrefixCaching).
  int cached_prompt_tokens = 0;
  // Prefill: from admission to the pass that gave the first token (every chunk of a chunked
  // prefill). Decode: from then until this sequence's last token.
  double prefill_seconds = 0, decode_seconds = 0;
  FinishReason finish = FinishReason::kLength;
  bool stopped_at_eos() const { return finish == FinishReason::kEos; }
  double AverageLayers() const;
  double DecodeTokensPerSecond() const;
};

// A sequence that has ended, and the slot it held.
struct FinishedSequence {
  int slot;
  GenerationResult result;
};

// Continuous batching over sequence slots: what a serving loop (launch/generation_service.h)
// drives. Implemented by Generator and by the leader of a PipelineGenerator.
class SequenceBatcher {
 public:
  virtual ~SequenceBatcher() = default;
  virtual int capacity() const = 0;       // most tokens (prompt + generated) of one sequence
  virtual int max_sequences() const = 0;  // slots
  // Why a request cannot run (naming the bad value), or OK.
  virtual absl::Status ValidateAll(const std::vector<GenerationRequest>& requests) const = 0;
  // Whether Admit(request) (of a valid request) finds a slot and KV room now.
  virtual bool CanAdmit(const GenerationRequest& request) const = 0;
  // Starts `request` in a free slot; returns the slot.
  virtual absl::StatusOr<int> Admit(GenerationRequest request) = 0;
  // Makes progress on the admitted sequences (on_token(slot, token) per token); returns those
  // that finished, whose slots are free again.
  virtual std::vector<FinishedSequence> Advance(
      const std::function<void(int, int32_t)>& on_token = nullptr) = 0;
  // Ends the sequence in `slot` now; returns what it generated so far.
  virtual GenerationResult Retire(int slot) = 0;
  virtual int active() const = 0;      // admitted sequences not finished
  virtual int free_slots() const = 0;  // slots Admit can take now
  // Forward passes run so far, and the most sequences one of them carried.
  virtual int64_t passes() const = 0;
  virtual int largest_pass() const = 0;
  // Sequences whose KV pages were taken back so that others could go on (they resume later by
  // recomputing their K/V; Generator::ReserveKvPerRequest).
  virtual int64_t preemptions() const { return 0; }
  // Tokens whose K/V prefills took from the prefix cache instead of computing them.
  virtual int64_t prefix_cached_tokens() const { return 0; }
  // Whether prompts' whole pages, once a pass has computed them, serve later prefills of the
  // same tokens (Generator::EnablePrefixCaching).
  virtual bool prefix_caching() const { return false; }
  // The KV cache's size in tokens, and the tokens running sequences hold.
  virtual int kv_tokens() const = 0;
  virtual int kv_tokens_in_use() const = 0;
};

// Why `requests` cannot run together on `batcher` (more than its slots, or a bad request), or OK.
absl::Status ValidateBatch(const SequenceBatcher& batcher,
                           const std::vector<GenerationRequest>& requests);

// Generates valid `requests` on `batcher` (no sequence running), admitting them in order as
// slots and KV room allow; on_token(i, token) as request i produces a token.
std::vector<GenerationResult> GenerateAll(SequenceBatcher& batcher,
                                          const std::vector<GenerationRequest>& requests,
                                          const std::function<void(int, int32_t)>& on_token);

class Generator : public SequenceBatcher {
 public:
  // `capacity`: most tokens (prompt + generated) one sequence may hold; `max_sequences`: most
  // sequences generated together. The KV cache is paged (engine/kv_pages.h): pools of
  // kKvPageTokens-token pages. `kv_tokens`: 0 gives each slot the pages of a whole context for
  // good; > 0 makes a pool of that many tokens (rounded up to whole pages), shared as vLLM shares
  // its blocks: a sequence is admitted when its prompt's pages are free (CanAdmit; beyond a
  // watermark of 1% of the pool while others run), and gains pages as it grows, wherever they
  // are free. When a pass's sequences need more pages than are free, the latest admitted are
  // preempted: their pages are freed, and they resume (before new admissions, oldest first) with
  // a prefill of their prompt and the tokens they had generated, which recomputes their K/V.
  // Their tokens do not change: the same K/V, the same sampling state.
  Generator(Model* model, int capacity, int max_sequences = 1, int kv_tokens = 0);
  // Instead, with kv_tokens > 0: admission takes the pages of prompt + max_new_tokens at once,
  // and nothing is preempted (pipelines: their stages run passes the leader sent earlier).
  void ReserveKvPerRequest() { kv_on_demand_ = false; }
  bool kv_on_demand() const { return kv_by_request_ && kv_on_demand_; }
  // Prefix caching (with kv_tokens > 0; not in pipelines): the pages of sequences' whole pages
  // of tokens, once their K/V are complete, are registered by their tokens (KvPagePool). A
  // prefill whose tokens begin with registered pages (all but its last token; a prompt to be
  // scored excepted) holds those pages and computes only the rest: a common prompt prefix, the
  // previous turn of a conversation, a preempted sequence resuming. Pages no sequence holds stay
  // cached until the pool needs them (least recently released first). Tokens do not change, up
  // to the rounding of the smaller prefill.
  void EnablePrefixCaching();
  // Chunked prefill (0: off): a pass takes at most `tokens` prompt rows of the prefilling
  // sequences together (those admitted first first; prompts being scored too), so that a long
  // prompt does not stall the running sequences' next tokens. The rest of a prompt waits for the
  // following passes; its last chunk decides the first token as a whole prefill would.
  void SetPrefillChunk(int tokens);
  int prefill_chunk() const { return prefill_chunk_; }
  bool prefix_caching() const override { return prefix_caching_; }
  int64_t prefix_cached_tokens() const override { return prefix_cached_tokens_; }
  int kv_cached_pages() const { return page_pool_.cached(); }  // registered, held by none
  static constexpr int kKvPageTokens = KvPagePool::kPageTokens;
  static int PagesFor(int tokens) { return (tokens + kKvPageTokens - 1) / kKvPageTokens; }
  // Bytes one token of the KV cache takes in `model`'s process: K and V of its layers and block
  // exits in the backend's operand dtype, and the fp32 hidden state a row keeps while pending.
  static int64_t KvBytesPerToken(const Model& model);
  // Rows one pass may carry: a whole context (a prompt at once), and at least 4 per sequence.
  static int RowBudget(int capacity, int max_sequences) {
    return std::max(capacity, 4 * max_sequences);
  }
  // Rows the heads project at once: a row per sequence and a round's check in one projection;
  // prompts score 64 rows at once.
  static int HeadRows(int max_sequences) {
    return std::max(max_sequences + kMaxDraftTokens + 1, 64);
  }
  // What a Generator(model, capacity, max_sequences, kv_tokens) allocates but for a few small
  // buffers whose size is fixed by the model: its KV cache, the activation rows, the heads' rows
  // and the tables that grow with the context and the number of sequences.
  static int64_t PlannedBytes(Model& model, int capacity, int max_sequences, int kv_tokens);
  int capacity() const override { return capacity_; }
  Model* model() const { return model_; }
  // Token ids at or past `tokens` (the tokenizer's size, where the model's vocabulary is padded
  // past it, as Megatron pads to a multiple of 128 x tp) are never produced: their logits read
  // as -inf (no probability, in sampling, confidence and log-probabilities), and prompts holding
  // them are refused. Default: the model's vocabulary.
  void set_token_limit(int tokens);
  int token_limit() const { return token_limit_; }
  int kv_tokens() const override { return kv_pages_ * kKvPageTokens; }
  int kv_tokens_in_use() const override;
  bool CanAdmit(const GenerationRequest& request) const override;
  // The KV pages of the sequence in `slot`, in position order.
  const std::vector<int32_t>& kv_pages(int slot) const { return seqs_.at(slot).pages; }
  // The K (or, with `values`, V) of positions [0, length(seq)) of the sequence in `seq` at
  // `layer`, in position order [length, hkv, d] (fp32, host).
  std::vector<float> KvToHost(int layer, int seq, bool values) const;
  static int RequestTokens(const GenerationRequest& r);  // prompt + max_new_tokens
  int max_sequences() const override { return static_cast<int>(seqs_.size()); }

  // Generates every request together (at most max_sequences()); on_token(i, token) is called as
  // request i produces a token. Errors name the request and the bad value. (Admit + Advance.)
  absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(
      const std::vector<GenerationRequest>& requests,
      const std::function<void(int, int32_t)>& on_token = nullptr);
  // One sequence.
  absl::StatusOr<GenerationResult> Generate(const std::vector<int32_t>& prompt, int max_new_tokens,
                                            int eos_id, const SamplingParams& sampling,
                                            const EarlyExitParams& ee,
                                            const std::function<void(int32_t)>& on_token = nullptr);
  // Why `request` cannot run (naming the bad value), or OK.
  absl::Status Validate(const GenerationRequest& request) const;
  // The first bad request of a batch ("prompt <i>: ..." when there are several), or OK.
  absl::Status ValidateAll(const std::vector<GenerationRequest>& requests) const override;

  // ---- continuous batching: sequences join and leave between passes --------------------------
  // Starts `request` in a free slot (the lowest, or `slot`); the next Advance() prefills it.
  // Returns the slot.
  absl::StatusOr<int> Admit(GenerationRequest request) override {
    return Admit(std::move(request), -1);
  }
  absl::StatusOr<int> Admit(GenerationRequest request, int slot);
  using Finished = FinishedSequence;
  // One forward pass over every admitted sequence (the prompts of those admitted since the last
  // pass, the newest token of the others), then each samples its next token; returns those that
  // finished, whose slots are free again. on_token(slot, token) is called per token.
  std::vector<Finished> Advance(
      const std::function<void(int, int32_t)>& on_token = nullptr) override;
  // Advance by parts, for a driver that runs the pass itself (PipelineGenerator): whether `slot`
  // holds a running sequence; the ids its next pass appends (its prompt, then its newest
  // token), and taking them; and taking the head output `r` for its newest token: samples the
  // token, records it and calls on_token; when that ends the sequence, fills *finished, frees
  // the slot and returns true, else queues the token for the next pass.
  bool busy(int slot) const { return seqs_.at(slot).busy; }
  // Whether the sequence's next pass is (a chunk of) its prefill, after admission or preemption.
  bool starts(int slot) const { return seqs_.at(slot).prefill; }
  int next_length(int slot) const { return static_cast<int>(seqs_.at(slot).next.size()); }
  // At most `most` of them (a prefill chunk); the rest stays for the next pass.
  std::vector<int32_t> TakeNext(int slot, int most = std::numeric_limits<int>::max());
  const GenerationRequest& request(int slot) const { return seqs_.at(slot).request; }
  const EarlyExitParams& early_exit(int slot) const { return request(slot).early_exit; }
  bool Accept(int slot, const StepResult& r, const std::function<void(int, int32_t)>& on_token,
              Finished* finished);
  // Prefix caching in a pipeline: registers the sequence's whole pages once its pass came back
  // (every stage has run its rows; later passes reach each stage after it). A sequence's pages
  // never change while it runs there (its stages hold copies of its page table), so a page
  // another one already registered is not swapped for it.
  void RegisterCompletePages(int slot);
  // A prefill chunk's pass (no token yet): keeps the prompt scores it brought, if any.
  void KeepPromptScores(int slot, const StepResult& r);
  void KeepPagesWhileRunning() { keep_pages_ = true; }
  // Ends the sequence in `slot` now (its request was cancelled, or a tensor-parallel follower
  // mirrors a stop its leader's callback decided); returns what it generated so far.
  GenerationResult Retire(int slot) override;
  int active() const override;  // admitted sequences not finished
  int free_slots() const override { return max_sequences() - active(); }
  int64_t passes() const override { return passes_; }
  int largest_pass() const override { return largest_pass_; }
  int64_t preemptions() const override { return preemptions_; }

  // ---- one pipeline stage (models/pipeline_generator.h) --------------------------------------
  // The model may be one stage of a pipeline: the generator then holds the KV caches of the
  // stage's layers and exits, and a pass runs just those.
  struct StageItem {
    int seq = 0;
    int start = 0;     // the sequence's length before this pass (its cached prefix when it starts)
    int n = 0;         // tokens this pass appends
    bool live = true;  // no earlier stage has decided its newest token: check this stage's exits
    bool partial = false;  // a prefill chunk before the last: no exit checks, no head
    EarlyExitParams early_exit;
    std::vector<int32_t> kv_pages;  // a new sequence in the slot: the KV pages the leader gave it
    // A prefill that scores its prompt: the prompt (no stage checks exits; the last stage
    // scores it and decides the first token with the final head), and the top tokens wanted.
    std::vector<int32_t> score_ids;
    int score_top = 0;
  };
  // One pass of this stage over `items`, from token ids [sum n] (host; first stage) or from the
  // previous stage's hidden states [sum n, hidden] (host; later stages), in item order. Every
  // row runs through all the stage's layers, decided or not, so that their K/V are complete and
  // nothing pends. Per item: the output of the head that decided its newest token here (an exit
  // reaching the threshold, or on the last stage the final head), or empty logits. At most
  // row_budget() rows.
  std::vector<StepResult> StagePass(const std::vector<StageItem>& items, const int32_t* ids,
                                    const float* hidden);
  // The stage's output after StagePass: hidden states [sum n, hidden] (device), in item order.
  const float* stage_output() const { return work_; }
  int row_budget() const { return row_budget_; }

  // ---- lower level (tests) -----------------------------------------------------------------
  void Reset();  // also frees every slot
  // Appends ids[s] to sequence s (sequences with no ids are left alone, pending rows included)
  // and runs one forward pass over them; returns each sequence's newest-token head output.
  std::vector<StepResult> StepBatch(const std::vector<std::vector<int32_t>>& ids,
                                    const std::vector<EarlyExitParams>& ee);
  StepResult Step(const std::vector<int32_t>& ids, const EarlyExitParams& ee);  // sequence 0
  // Completes the deep K/V of every sequence's pending tokens.
  void FinishPending();
  int length(int seq = 0) const;
  int pending_start(int seq = 0) const;

 private:
  struct Sequence {
    // Its KV pages (in the pools of every local layer and local block exit, and of the pending
    // rows' hidden states), in position order; the table over them; the caches through it.
    std::vector<int32_t> pages;
    KvPageTable table;
    std::vector<KvLayer> kv, exit_kv;
    std::vector<int> depth;  // per position: layers computed
    int len = 0, pending_start = 0;
    bool checks_exits = false;  // its last step checked exits (block exits keep their K/V)
    // The request running in this slot (Admit / Advance).
    bool busy = false, prefilled = false;
    bool prefill = false;  // its next pass is a prefill (after admission or preemption)
    GenerationRequest request;
    Rng rng;
    GenerationResult result;
    std::vector<int32_t> next;  // what the next pass appends: the prompt, then each new token
    Timer timer;                // since admission, then since the prefill
    // Self-speculative decoding (the request's `speculative`): the drafts of this round and
    // their distributions; how many the round drafts; whether the next pass checks them (a full
    // pass; so is the prefill).
    bool speculative() const { return request.speculative.enabled(); }
    int round_drafts = 0;
    std::vector<int32_t> drafts;
    std::vector<std::vector<double>> draft_dist;
    bool checking = false;
    // KV pages on demand: when it was admitted (the latest are preempted first); whether it is
    // preempted, waiting to resume.
    int64_t admitted_at = 0;
    bool preempted = false;
    int registered_pages = 0;  // prefix caching: its leading pages registered (or found)
  };
  // A sequence's part in one forward pass.
  struct Item {
    int seq = 0, n_new = 0;
    const int32_t* new_ids = nullptr;     // [n_new] on the device
    const float* new_hidden = nullptr;    // or their input hidden states [n_new, c] (host)
    const EarlyExitParams* ee = nullptr;  // null: no exit checks
    StepResult* out = nullptr;
    int work_row = 0;         // its first row in work_
    int start = 0, end = 0;   // positions [start, end) run in this pass
    bool fired = false;       // a head has decided its newest token
    bool keep_going = false;  // run its rows through every layer even once fired (stages)
    bool all_rows = false;    // the final head scores every row of the pass (drafts' check)
    bool no_head = false;     // a prefill chunk before the last: no head decides a token
    const int32_t* score_ids = nullptr;  // a prefill that scores its prompt: the ids (host)
    int score_top = 0;                   // ... with this many most likely tokens per position
  };
  // Rows [first, first + rows) of an item that reach one depth; `packed`: where they sit.
  struct Piece {
    Item* item = nullptr;
    int first = 0, rows = 0, packed = 0;
  };
  bool ExitAllowed(int i, const EarlyExitParams& ee) const;
  // StepBatch, with `check[s]`: the final head scores every row sequence s runs (empty: none);
  // `partial[s]`: its rows are a prefill chunk before the last (no exit checks, no head).
  std::vector<StepResult> Pass(const std::vector<std::vector<int32_t>>& ids,
                               const std::vector<EarlyExitParams>& ee,
                               const std::vector<bool>& check,
                               const std::vector<bool>& partial = {});
  // Records token `tok` of the sequence in `slot`, produced by a head with `logits` [vocab], and
  // calls on_token; when that ends the sequence, fills *finished, frees the slot and returns true.
  bool Emit(int slot, int32_t tok, int exit_index, int depth, const float* logits,
            const std::function<void(int, int32_t)>& on_token, Finished* finished);
  void Finish(int slot, FinishReason why, Finished* finished);  // ends it; frees the slot
  // The final head over a prefill's rows but the newest: each predicts the next prompt token.
  void ScorePrompt(Item& it);
  // ---- self-speculative decoding (generator_speculative.cc) ----
  absl::Status ValidateSpeculative(const GenerationRequest& r) const;
  // The exits the sequence's next pass checks: the drafting exit, always firing, or none.
  EarlyExitParams SpeculativePassExits(const Sequence& q) const;
  // Accept() for a speculative sequence: keeps a draft, or checks the round's drafts, emits
  // what the full model keeps, drops the rest from the cache and plans the next round.
  bool AcceptSpeculative(int slot, const StepResult& r,
                         const std::function<void(int, int32_t)>& on_token, Finished* finished);
  // ---- the paged KV cache ----
  // Gives the sequence free pages until they hold `tokens` (the page after its last when free,
  // else the lowest); false, taking none, when too few are free.
  bool GrowKv(Sequence& q, int tokens);
  void SetPages(Sequence& q, const std::vector<int32_t>& pages);
  // The table after its pages changed from index `first` on: its count, and the device copy.
  void SyncPageTable(Sequence& q, size_t first);
  void ReleaseKv(Sequence& q);  // frees its pages (kv_tokens > 0)
  // Prefix caching: the registered pages holding the first whole pages of `tokens` but its last
  // token, which a prefill of them for `r` would hold: with block exits' K/V when `r` checks
  // exits; none without prefix caching or for a prompt being scored (`scoring`).
  std::vector<int32_t> CachedPrefix(const GenerationRequest& r, const std::vector<int32_t>& tokens,
                                    bool scoring) const;
  // A sequence about to prefill q.next (no pages yet) holds its cached prefix's pages and leaves
  // the rest to compute; returns the tokens found.
  int UseCachedPrefix(Sequence& q);
  // Registers the sequence's whole pages whose K/V are complete (kept tokens only).
  void RegisterPages(Sequence& q);
  // Whether a sequence's pages hold its block exits' K/V: those are written in every pass where
  // some sequence checks exits, so a sequence that checks exits always has them.
  bool KeepsExitKv(const GenerationRequest& r) const {
    return !block_exits_ || r.early_exit.threshold < 1.0f || r.speculative.enabled();
  }
  // The free pages starting a prefill of `tokens` takes (with pages for `reserve` tokens in
  // all): those its cached prefix does not already hold for other sequences.
  int PagesToStart(const GenerationRequest& r, const std::vector<int32_t>& tokens, int reserve,
                   bool scoring) const;
  int WatermarkPages() const;  // free pages admission leaves while sequences run
  // KV pages on demand, before a pass: gives each running sequence the pages its next pass
  // needs, preempting the latest admitted while too few are free; then resumes the preempted,
  // oldest first, while their pages are free.
  void PlanKv();
  void Preempt(Sequence& q);
  void CountPass(int sequences);  // a pass of `sequences` (none: no pass) for passes()
  // Runs items' rows forward, in groups whose rows fit the work buffers.
  void Forward(std::vector<Item>& items);
  void ForwardGroup(Item* items, int n);
  // Checks the exits at `depth` for the pieces (rows that just reached it, packed in `in` with
  // positions `pos`); fills the block exits' K/V.
  void CheckExits(int depth, const std::vector<Piece>& pieces, const float* in, const int32_t* pos);
  // The pieces' rows packed together, with their positions: in place when they already lie
  // together in the work buffer (work_row: where), else copied into packed_ (work_row -1).
  struct Packed {
    const float* rows;
    const int32_t* pos;
    int work_row;
  };
  Packed Pack(std::vector<Piece>& pieces);
  // Projects rows[k] with head `exit_index` (-1 final) and copies the logits to the host.
  const std::vector<float>& ProjectToHost(ConstOperand rows, int exit_index, int k);

  Model* model_;
  Backend* be_;
  int capacity_, row_budget_;
  int token_limit_;  // ids >= this are never produced (set_token_limit)
  int head_rows_;    // rows one final-head projection takes: a row per sequence + a round's check
  bool kv_by_request_ = false;  // kv_tokens > 0: pages taken per request
  bool kv_on_demand_ = true;    // ... as sequences grow (else all at admission)
  int64_t admissions_ = 0, preemptions_ = 0, prefix_cached_tokens_ = 0;
  bool prefix_caching_ = false;
  bool keep_pages_ = false;  // KeepPagesWhileRunning
  int prefill_chunk_ = 0;
  // The model has block exits, on any stage: their K/V are in the pages (each stage's of its own).
  bool block_exits_ = false;
  int kv_pages_ = 0;                             // in the pools
  size_t kv_row_ = 0;                            // elements of one token's K (or V) per layer
  std::vector<KvLayer> pool_kv_, pool_exit_kv_;  // [kv_pages_ * kKvPageTokens, kv_row_] each
  float* pool_frontier_ = nullptr;               // [kv_pages_ * kKvPageTokens, c]
  KvPagePool page_pool_;                         // kv_tokens > 0
  int32_t* device_pages_ = nullptr;  // the sequences' page tables: [max_sequences, seq_pages]
  int first_, end_;  // the model's layers [first_, end_) (a pipeline stage's, or all)
  Arena arena_;
  std::vector<Sequence> seqs_;
  BlockActs acts_;
  std::vector<ExitActs> exit_acts_;
  NormActs final_norm_;
  float *work_, *packed_, *newest_;   // [row_budget, c] x2, [head_rows, c]
  Operand newest_ops_;                // [max_sequences, c]
  float* logits_;                     // [head_rows, vocab] (this rank's shard under tp)
  float* gathered_logits_ = nullptr;  // [tp, head_rows, vocab / tp] (tensor parallelism)
  int32_t* pos_;                      // [capacity]: 0, 1, ...
  int32_t *work_pos_, *packed_pos_;   // [row_budget]: positions of work_'s and packed_'s rows
  int32_t* staged_ids_;               // [max_sequences * capacity]: a pass's new ids
  std::vector<float> host_logits_;
  int64_t passes_ = 0;  // StepBatch and StagePass calls with work
  int largest_pass_ = 0;
};

}  // namespace eellm
