// PipelineExecutor: runs one training step of a pipeline schedule (parallel/pipeline) for this
// rank's stage of the model: microbatch forwards and backwards, activations and gradients sent
// to the neighbouring stages over the pipeline communicator (non-blocking sends, blocking
// receives, matched in order per channel). With `place_exits`, exit-head work becomes its own
// action placed into the schedule's bubbles (PlaceExitHeads); otherwise it runs fused into the
// backward slot of its layer. The schedule decides the order, the executor only follows it.
// Each step's compute intervals are recorded, so the real timeline can be compared with the
// cost model's.
#pragma once

#include <memory>
#include <vector>

#include "absl/types/span.h"
#include "models/transformer.h"
#include "parallel/parallel_context.h"
#include "parallel/pipeline/schedule.h"
#include "parallel/pipeline/simulator.h"

namespace eellm {

class PipelineExecutor {
 public:
  // `micro_batch` rows of `seq` tokens per microbatch, `microbatches` per step.
  PipelineExecutor(Model* model, ParallelContext* ctx, int micro_batch, int seq, int microbatches,
                   bool place_exits);

  // One step over microbatches of ids/targets (host, [microbatches * micro_batch * seq], this
  // data-parallel rank's rows). Accumulates gradients of the mean objective over microbatches.
  // Returns the losses of this stage's heads averaged over microbatches (0 for other heads).
  LossReport TrainStep(const int32_t* ids, const int32_t* targets,
                       absl::Span<const float> exit_weights);
  // Forward only (validation): same microbatching, no gradients.
  LossReport Evaluate(const int32_t* ids, const int32_t* targets);

  const Schedule& schedule() const { return schedule_; }
  // This stage's compute intervals of the last TrainStep (seconds since the step began).
  const std::vector<BusyInterval>& last_step_intervals() const { return intervals_; }

 private:
  LossReport Run(const Schedule& s, const int32_t* ids, const int32_t* targets,
                 absl::Span<const float> exit_weights, bool backward);
  void WaitSlot(int slot);

  Model* model_;
  ParallelContext* ctx_;
  int micro_batch_, seq_, microbatches_;
  Schedule schedule_;
  std::vector<std::unique_ptr<Workspace>> slots_;  // one per microbatch in flight
  std::vector<Buffer> grad_in_;                    // received output gradients, per slot
  std::vector<std::vector<std::unique_ptr<Request>>> pending_;  // sends from each slot
  std::vector<BusyInterval> intervals_;
};

}  // namespace eellm
