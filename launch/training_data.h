// The training and validation data of a run (train.data): one prefix or a weighted blend of them
// (models/data_blend.h), each `eellm data`'s token files (<prefix>.train.bin, .val.bin) or a
// Megatron dataset (<prefix>.bin, .idx; models/megatron_data.h) split at train.val_fraction,
// checked against the model's vocabulary and the batch and sequence sizes.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "launch/train_config.h"
#include "models/data_blend.h"
#include "models/token_dataset.h"

namespace eellm {

struct TrainingData {
  BlendedDataset train;
  TokenDataset val;
};

// Errors name the prefix and what is wrong (missing files, too little data, token ids past
// `vocab_size`). `verbose`: print what was read.
absl::StatusOr<TrainingData> LoadTrainingData(const TrainConfig& tc, int vocab_size, bool verbose);

// This data-parallel rank's `rows` rows (from row `first_row` of the global batch) of step
// `step`, whose global batch starts at training sample `step_samples`: train.sampling's epochs
// (BlendedDataset::EpochRows) or random windows (RandomRows, a function of the step).
void TrainingRows(const BlendedDataset& train, const TrainConfig& tc, int step,
                  int64_t step_samples, int64_t first_row, int rows, int32_t* inputs,
                  int32_t* targets);

// The training samples a checkpoint at `step` had consumed, from its train_state attribute
// (consumed_samples, which a change of batch_size on resume keeps right), or `step *
// batch_size` when it has none (checkpoints from before epoch sampling).
int64_t ConsumedSamples(const std::map<std::string, std::string>& checkpoint_attrs, int step,
                        int batch_size);

// One line on what steps [start, tc.steps) draw: the epochs of each part they take.
std::string SamplingSummary(const BlendedDataset& train, const TrainConfig& tc, int start,
                            int64_t start_samples);

}  // namespace eellm
