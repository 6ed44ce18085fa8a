// The EE-Tuning side of a training run (train.freeze_backbone): what it reports about the frozen
// backbone, and its hidden-state cache (train.tune_cache_mb, models/tune_input_cache.h): the
// checks, and whether this run uses it.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "launch/train_config.h"
#include "models/data_blend.h"
#include "models/model_config.h"
#include "models/pipeline_executor.h"
#include "parallel/parallel_context.h"

namespace eellm {

// Prints (rank 0) what a frozen-backbone run trains: the exits' `trainable` parameters, this
// rank's `gradient_elements` of its `padded` arena elements, the layers it runs (`cut` > 0: the
// layers built, the rest copied from `rest_source` on saves) and idle pipeline stages.
void PrintFrozenBackbone(const ModelConfig& mc, const TrainConfig& tc, double trainable,
                         int64_t gradient_elements, double padded, int cut,
                         const std::string& rest_source);

// Errors name the setting that rules the cache out (it needs freeze_backbone, epoch sampling,
// dp 1, no hidden dropout, no sequence parallelism).
absl::Status ValidateTuneCache(const TrainConfig& t);

// Sets `exec`'s cache (after set_frozen_backbone) when train.tune_cache_mb > 0, the budget holds
// every window of `train` on every rank and fits the host memory free to each rank (agreed over
// ctx.world through `be`), and at least a tenth of steps [start, tc.steps) from training sample
// `start_samples` would run from it (their windows all read by earlier steps of the run).
// Returns what it did, for the log ("" when tune_cache_mb is 0).
std::string SetUpTuneCache(PipelineExecutor& exec, const BlendedDataset& train,
                           const TrainConfig& tc, int start, int64_t start_samples,
                           ParallelContext& ctx, Backend* be);

}  // namespace eellm
