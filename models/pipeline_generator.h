// Early-exit generation over pipeline stages: EE-LLM's "pipeline-based" inference on the training
// partitions. Each rank holds one stage of the model (with tensor parallelism, one shard of it)
// and a Generator over it. Every stage runs every token through all its layers, so each layer's
// KV cache is always complete and nothing is recomputed; the first head whose confidence reaches
// the sequence's threshold (an exit, or the final head) decides the token. The deciding stage
// sends that head's logits to stage 0, which samples the token and starts the sequence's next
// pass at once, while the deeper stages are still finishing the previous token: a token that
// exits at stage s costs the latency of stages 0..s, and stages s+1.. overlap with the next one.
// Passes of different sequences are in flight in different stages at the same time.
//
// Ranks: world rank = stage * tp + tensor-parallel rank. Stage 0's tensor-parallel rank 0 (the
// leader) holds the requests, samples and schedules passes; its tensor-parallel peers run the
// passes it sends them. Each rank sends its stage's output to the same tensor-parallel rank of
// the next stage; rank 0 of a deeper stage sends the decisions. Messages go over a host
// communicator and are posted without blocking, so no stage waits on a busy neighbour, and
// between two stages they arrive in order, so each KV cache fills in position order.
//
// Scheduling: a pass carries at most 1/stages of the running sequences (taken round-robin), so
// the batch circulates as one group per stage and every stage has work; at most 2 passes per
// stage are on their way. A long prompt's prefill chunks follow one another into the pipeline
// without waiting for the previous chunk's answer (every stage runs them in order). KV: the leader
// gives each sequence its KV pages (Generator's kv_tokens) and its first pass carries them. Pages
// freed when a sequence ends may go to the next one while deeper stages still run the old one's
// last rows; that is safe because every stage runs the passes in the order the leader sent them.
//
// A sequence gets the tokens, exits and depths the whole model gives it in a Generator (KV
// recomputation fills the same K/V later), up to the rounding of differently batched GEMMs.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "models/generator.h"
#include "parallel/comm/communicator.h"

namespace eellm {

class Outbox;  // pending non-blocking sends (pipeline_generator.cc)

class PipelineGenerator : public SequenceBatcher {
 public:
  // `stage_generator`: over this rank's stage; `world`: a host communicator over the
  // stages * tp ranks of the pipeline, ranked as above.
  PipelineGenerator(Generator* stage_generator, Communicator* world, int stages, int tp);
  ~PipelineGenerator() override;

  // Every rank calls it with the same requests. The leader returns the results (and calls
  // on_token(i, token) as request i produces a token); the other ranks return an empty vector
  // once the leader is done. Errors (naming the bad request) are returned on every rank.
  absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(
      const std::vector<GenerationRequest>& requests,
      const std::function<void(int, int32_t)>& on_token = nullptr);

  bool leader() const { return stage_ == 0 && tp_rank_ == 0; }
  int stage() const { return stage_; }
  int stages() const { return stages_; }
  int tp() const { return tp_; }
  const Generator& generator() const { return *gen_; }

  // ---- the leader: continuous batching (a GenerationService can drive it) -------------------
  int capacity() const override { return gen_->capacity(); }
  int max_sequences() const override { return gen_->max_sequences(); }
  absl::Status ValidateAll(const std::vector<GenerationRequest>& requests) const override {
    return gen_->ValidateAll(requests);
  }
  absl::StatusOr<int> Admit(GenerationRequest request) override;
  bool CanAdmit(const GenerationRequest& request) const override {
    return free_slots() > 0 && gen_->CanAdmit(request);
  }
  // Takes the decisions that have arrived, then runs a pass of stage 0 over every sequence whose
  // next tokens are known; when there is none, waits for a decision instead.
  std::vector<FinishedSequence> Advance(
      const std::function<void(int, int32_t)>& on_token = nullptr) override;
  // A sequence whose token a deeper stage is still deciding, or whose prefill chunks a deeper
  // stage has still to answer, keeps its slot until those answers arrive (and are dropped).
  GenerationResult Retire(int slot) override;
  int active() const override { return gen_->active(); }
  // Stage 0's passes.
  int64_t passes() const override { return gen_->passes(); }
  int64_t prefix_cached_tokens() const override { return gen_->prefix_cached_tokens(); }
  bool prefix_caching() const override { return gen_->prefix_caching(); }
  int kv_tokens() const override { return gen_->kv_tokens(); }
  int kv_tokens_in_use() const override { return gen_->kv_tokens_in_use(); }
  int largest_pass() const override { return gen_->largest_pass(); }
  int free_slots() const override;
  // Ends the other ranks' Work() once every pass sent is done (the destructor does it when
  // needed). To run again, every other rank must call Work() again (GenerateBatch does both).
  void Stop();

  // ---- every other rank ----------------------------------------------------------------------
  // Runs this stage's passes as they arrive until the leader stops.
  void Work();

  struct Stats {
    int64_t passes = 0;        // passes this rank's stage ran
    int64_t rows = 0;          // token rows they carried
    int64_t decided_here = 0;  // tokens this stage's heads decided
    double pass_seconds = 0;   // spent in the stage's passes (the rest: messages and waiting)
    // The leader: the most passes of one sequence on their way at once (prefill chunks), since
    // the run began (GenerateBatch, or the first Admit after Stop).
    int most_in_flight_of_one = 0;
  };
  const Stats& stats() const { return stats_; }
  // Every rank's stats().pass_seconds, in rank order; every rank calls it.
  std::vector<double> PassSecondsOfEveryRank();

 private:
  int Rank(int stage, int tp_rank) const { return stage * tp_ + tp_rank; }
  void Start();  // the leader: posts the receives of the deeper stages' decisions
  // The leader: takes the decisions that have arrived; with `wait`, waits until one has.
  void Poll(bool wait, const std::function<void(int, int32_t)>& on_token,
            std::vector<FinishedSequence>* finished);
  void Take(int slot, const StepResult& r, const std::function<void(int, int32_t)>& on_token,
            std::vector<FinishedSequence>* finished);

  Generator* gen_;
  Communicator* world_;
  int stages_, tp_, stage_, tp_rank_;
  Stats stats_;
  // The leader's state.
  struct Inbox {  // decisions from a deeper stage: a posted receive of the next message's size
    int64_t size = 0;
    std::unique_ptr<Request> request;
    bool stopped = false;
  };
  bool started_ = false;
  std::vector<Inbox> inbox_;  // [stages]; 1.. used
  // Per slot: its passes whose answer has not come back (a deeper stage decides a token, or the
  // last stage reports a prefill chunk done); whether one of them decides its next token (until
  // then it takes no pass; while only chunks are on their way, its next chunk can follow them);
  // retired while passes were in flight.
  std::vector<int> in_flight_;
  std::vector<char> deciding_;
  std::vector<char> abandoned_;
  int next_slot_ = 0;                          // where the next pass starts looking for sequences
  int64_t passes_sent_ = 0, passes_done_ = 0;  // to stage 1; answered by the last stage
  std::unique_ptr<Outbox> outbox_;
};

}  // namespace eellm
