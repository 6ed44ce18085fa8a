// The training and validation data of a run (train.data): one prefix or a weighted blend of them
// (models/data_blend.h), each `eellm data`'s token files (<prefix>.train.bin, .val.bin) or a
// Megatron dataset (<prefix>.bin, .idx; models/megatron_data.h) split at train.val_fraction,
// checked against the model's vocabulary and the batch and sequence sizes.
#pragma once

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

}  // namespace eellm
