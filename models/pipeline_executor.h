// PipelineExecutor: runs one training step of a pipeline schedule (parallel/pipeline) for this
// rank's stage of the model: microbatch forwards and backwards, activations and gradients sent
// to the neighbouring stages over the pipeline communicator (non-blocking sends and receives,
// matched in order per channel; each run of messages is posted as send_posting.h's PostAfter
// says and its receives are waited for before the next compute). With `place_exits`, exit-head work
// becomes its own action placed into the schedule's bubbles (PlaceExitHeads; interleaved: right
// before its backward, see BatchExchanges); otherwise it runs fused into the backward slot of its
// layer. The schedule decides the order, the executor only follows it. Each step's compute
// intervals are recorded, so the real timeline can be compared with the cost model's.
//
// Interleaved pipeline parallelism (virtual stages): with several model chunks per rank the
// executor runs Interleaved1F1B with its messages in batched exchanges (BatchExchanges: what
// NCCL's rendezvous sends need). Chunk c of pipeline rank s holds virtual stage c * pp + s;
// activations of (s, c) go to (s + 1, c), or to (0, c + 1) from the last rank (gradients the
// reverse way). Messages carry the tag of the sending (microbatch, chunk, direction), so they
// cannot mix; with pp == 1 the neighbour is this rank and the tensor is copied locally. Each
// chunk has its own pool of workspaces; a (microbatch, chunk) record takes a workspace at its
// first action and returns it after its last, and at most MaxInFlight(schedule, stage) records
// are ever held (checked).
#pragma once

#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "models/transformer.h"
#include "models/tune_input_cache.h"
#include "parallel/parallel_context.h"
#include "parallel/pipeline/schedule.h"
#include "parallel/pipeline/simulator.h"

namespace eellm {

class PipelineExecutor {
 public:
  // `micro_batch` rows of `seq` tokens per microbatch, `microbatches` per step.
  PipelineExecutor(Model* model, ParallelContext* ctx, int micro_batch, int seq, int microbatches,
                   bool place_exits);
  // Interleaved: chunks[c] is this rank's model chunk c (StageSpec{c * pp + s, pp * chunks}).
  // One chunk gives the plain 1F1B executor above. Requires microbatches % pp == 0 when
  // chunks.size() > 1.
  PipelineExecutor(std::vector<Model*> chunks, ParallelContext* ctx, int micro_batch, int seq,
                   int microbatches, bool place_exits);

  // One step over microbatches of ids/targets (host, [microbatches * micro_batch * seq], this
  // data-parallel rank's rows). Accumulates gradients of the mean objective over microbatches.
  // Returns the losses of this stage's heads averaged over microbatches (0 for other heads).
  LossReport TrainStep(const int32_t* ids, const int32_t* targets,
                       absl::Span<const float> exit_weights);
  // Forward only (validation): same microbatching, no gradients.
  LossReport Evaluate(const int32_t* ids, const int32_t* targets);

  // EE-Tuning: TrainStep then runs the forwards alone (Evaluate's schedule), each stage's exits
  // with their backward after each forward's send (Model::StageTuneExits, as ExitHeads
  // actions): only the exits' parameters get gradients, and no gradient crosses stages. Its losses:
  // every exit's, and the final head's (no backward); its objective counts the exits alone.
  // `stop_at_deepest_exit`: no layer past the deepest exit runs (stages after the last one
  // holding an exit do nothing), and the final head's loss is not computed (reported as 0).
  void set_frozen_backbone(bool frozen, bool stop_at_deepest_exit = true);
  // EE-Tuning's hidden-state cache (models/tune_input_cache.h), after set_frozen_backbone: room
  // for `windows` training windows (0: none). A step whose windows (set_step_windows) are all
  // held skips the backbone: each of its exit-work actions first writes the rows the cache
  // holds (Model::TuneInputs) instead of a forward having made them, and no pipeline message
  // is sent; the other steps admit their new windows while there is room and store their rows
  // after each forward. The rows read back are those the forward made, so a cached step computes
  // exactly what the full one does. Without hidden dropout or sequence parallelism.
  void set_tune_cache(int64_t windows);
  // Host bytes the cache keeps per window on this rank (over its chunks), and the cache.
  size_t TuneCacheBytesPerWindow();
  const TuneInputCache* tune_cache() const { return tune_cache_.get(); }
  // The training window of each row of the next TrainStep ([microbatches * micro_batch], this
  // rank's rows in order); needed with the cache.
  void set_step_windows(std::vector<int64_t> windows) { step_windows_ = std::move(windows); }
  // TrainSteps run from the cache so far.
  int64_t cached_steps() const { return cached_steps_; }
  // Megatron's --eod-mask-loss: the heads' losses leave out the positions whose input id is
  // `eod_id` (-1: none left out), in training and in Evaluate.
  void set_eod_loss_mask(int eod_id) { eod_id_ = eod_id; }
  // The global index of the first sample (row of micro_batch rows) of the next TrainStep on this
  // rank: hidden dropout numbers rows by it (Model::set_hidden_dropout), so that every layout
  // drops the same elements of a sample.
  void set_first_sample(int64_t first) { first_sample_ = first; }
  // Whether a frozen-backbone step computes the final head's loss.
  bool tune_computes_final_loss() const {
    return tune_depth_ == chunks_[0]->config().num_layers &&
           chunks_[0]->depth() == chunks_[0]->config().num_layers;
  }

  // Called during each chunk's last backward of a step as each of its layers finishes, with the
  // chunk index and the arena range of the layer's (now final) gradients; see
  // DistributedOptimizer::GradientsReady.
  void set_grads_ready(std::function<void(int chunk, size_t lo, size_t hi)> fn) {
    grads_ready_ = std::move(fn);
  }

  const Schedule& schedule() const { return schedule_; }
  // What TrainStep runs: schedule(), or with a frozen backbone the forwards and exit work.
  // (The exit work alone when the last step ran from the tune cache.)
  const Schedule& step_schedule() const {
    return !frozen_backbone_ ? schedule_ : last_step_cached_ ? cached_schedule_ : tune_schedule_;
  }
  // This stage's compute intervals of the last TrainStep (seconds since the step began).
  const std::vector<BusyInterval>& last_step_intervals() const { return intervals_; }
  // Most (microbatch, chunk) records this rank held at once in any run so far (never more than
  // MaxInFlight(schedule(), stage)).
  int peak_in_flight() const { return peak_in_flight_; }

 private:
  enum class Mode { kTrain, kEvaluate, kTuneExits, kTuneCached };
  // The cache's rows of the windows of microbatch m for chunk ch: stored from (store) or
  // written into the workspace's TuneInputs.
  void CopyTuneInputs(Workspace& ws, int m, int ch, bool store);
  std::vector<size_t> TuneFloatsPerWindow();  // per chunk: what its TuneInputs hold per window
  LossReport Run(const Schedule& s, const absl::Status& rendezvous, const int32_t* ids,
                 const int32_t* targets, absl::Span<const float> exit_weights, Mode mode);

  struct Slot {
    std::unique_ptr<Workspace> ws;
    Buffer grad_in;                                 // received input activations / output gradients
    std::vector<std::unique_ptr<Request>> pending;  // sends reading from this slot
    bool busy = false;
  };
  void WaitSlot(Slot& slot);

  std::vector<Model*> chunks_;
  ParallelContext* ctx_;
  int micro_batch_, seq_, microbatches_;
  Schedule schedule_;
  absl::Status schedule_rendezvous_;  // CheckRendezvous(schedule_), checked once
  Schedule forward_schedule_;         // its forwards alone (evaluation)
  absl::Status forward_rendezvous_;
  Schedule tune_schedule_;  // EE-Tuning: the forwards, each with its exits after its send
                            // (built by set_frozen_backbone)
  absl::Status tune_rendezvous_;
  Schedule cached_schedule_;  // the tune schedule's exit work alone (steps from the cache)
  std::unique_ptr<TuneInputCache> tune_cache_;
  std::vector<int64_t> step_windows_;
  std::vector<bool> admitted_;  // per row of the step: its window admitted by this step
  int64_t cached_steps_ = 0;
  bool last_step_cached_ = false;
  bool frozen_backbone_ = false;
  int tune_depth_ = 0;  // EE-Tuning: the layers a step runs (the deepest exit's depth, or all)
  int eod_id_ = -1;     // set_eod_loss_mask
  int64_t first_sample_ = 0;
  std::vector<float> loss_mask_;          // [microbatches * rows] of a step, with eod_id_
  std::vector<std::vector<Slot>> slots_;  // [chunk] -> workspaces for records in flight
  std::vector<BusyInterval> intervals_;
  LossLog loss_log_;  // the heads' losses of a pass, read back at its end
  std::function<void(int, size_t, size_t)> grads_ready_;
  int peak_in_flight_ = 0;
};

}  // namespace eellm
