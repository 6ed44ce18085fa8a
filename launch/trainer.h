// The single-rank training loop behind `eellm train`: data, model, AdamW with warm-up + cosine
// LR, per-step logging of every head's loss, periodic validation per exit, HDF5 checkpoints
// with exact resume of the optimizer state and step.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/train_config.h"

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
  std::string checkpoint;  // path written
};

struct TrainOptions {
  std::string resume;  // checkpoint to resume from ("" = fresh start)
  bool verbose = true;
};

absl::StatusOr<TrainSummary> RunTraining(const RunConfig& rc, const TrainOptions& opts);

}  // namespace eellm
