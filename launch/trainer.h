// The single-rank training loop behind `eellm train`: data, model, AdamW with warm-up + cosine
// LR, per-step logging of every head's loss, periodic validation per exit, HDF5 checkpoints
// with exact resume of the optimizer state and step.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "launch/train_config.h"
#include "parallel/parallel_context.h"

namespace eellm {

struct EvalResult {
  double final_loss = 0;
  std::vector<double> exit_losses;
};

struct TrainSummary {
  int steps_done = 0;
  double tokens_per_second = 0;  // training throughput over the run
  double seconds = 0;
  std::vector<double> first_train_losses;  // final head then exits, at the first step
  std::vector<double> last_train_losses;   // averaged over the last log interval
  EvalResult first_eval, last_eval;        // validation before training and at the end
  int64_t num_params = 0;
  // Elements of this rank's gradient arenas, which the optimizer's two moments mirror: every
  // parameter's, or with a frozen backbone the trainable tail's.
  int64_t gradient_elements = 0;
  std::string checkpoint;         // step directory written last
  int early_buckets = 0;          // data-parallel buckets started during the last step's backward
  int64_t tune_cached_steps = 0;  // steps run from the tune cache (train.tune_cache_mb)
};

struct TrainOptions {
  std::string resume;  // checkpoint to resume from ("" = fresh start)
  // Checkpoint whose weights start the run (optimizer and step start afresh): a converted or
  // exit-extended model (EE-Tuning). Its model config must equal the run's.
  std::string init_from;
  bool verbose = true;  // progress output (rank 0 only)
  // Ranks and groups; null = one process. Its layout must match train.tp/pp/dp.
  ParallelContext* ctx = nullptr;
  // Compute backend; null = made from train.backend.
  Backend* backend = nullptr;
  // Per-step losses (final head then exits, averaged over data-parallel ranks) are appended
  // here when non-null (tests compare layouts step by step).
  std::vector<std::vector<double>>* step_losses = nullptr;
  std::vector<double>* step_grad_norms = nullptr;
  std::vector<float>* final_params = nullptr;  // the parameter arena after training
  // Print the measured pipeline timeline of the last step (per-stage busy/idle, bubble
  // fraction) beside the cost model's prediction for the same schedule.
  bool print_timeline = false;
  // Tests: every rank's checkpoint shard write fails after this many tensors (< 0 = never).
  int fail_save_after = -1;
};

// Checks that the model can be split over the layout (layers over stages, heads, KV heads and
// vocabulary over tensor-parallel ranks, batch over data-parallel ranks); errors name the
// numbers.
absl::Status ValidateLayout(const RunConfig& rc);

// Microbatches per optimizer step on each data-parallel rank: its batch_size / dp sequences in
// microbatches of micro_batch_size (0: one microbatch). 0 where those do not divide.
int MicrobatchesPerStep(const TrainConfig& t);

// The layers the pipeline stages split: num_layers, or with skip_layers_past_exits the deepest
// exit's depth.
int SplitDepth(const RunConfig& rc);

absl::StatusOr<TrainSummary> RunTraining(const RunConfig& rc, const TrainOptions& opts);

}  // namespace eellm
