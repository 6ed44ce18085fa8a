#include "launch/training_data.h"

#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/status.h"
#include "models/megatron_data.h"

namespace eellm {
namespace {

// The training and validation streams of one data prefix: `eellm data`'s token files
// (<prefix>.train.bin, .val.bin), or a Megatron dataset (<prefix>.bin, .idx) split at
// `val_fraction`.
absl::StatusOr<std::pair<TokenDataset, TokenDataset>> LoadPrefix(const std::string& prefix,
                                                                 float val_fraction, bool verbose) {
  const bool megatron = IsMegatronPrefix(prefix);
  if (!megatron && !std::filesystem::exists(prefix + ".train.bin")) {
    // One of a Megatron pair alone: name the other.
    for (const auto& [have, lack] : {std::pair{".bin", ".idx"}, std::pair{".idx", ".bin"}}) {
      if (std::filesystem::exists(prefix + have)) {
        return absl::NotFoundError(absl::StrCat("Megatron dataset ", prefix, ": ", prefix, have,
                                                " exists but ", prefix, lack, " does not"));
      }
    }
  }
  if (!megatron) {
    ASSIGN_OR_RETURN(TokenDataset train, TokenDataset::Load(prefix + ".train.bin"));
    ASSIGN_OR_RETURN(TokenDataset val, TokenDataset::Load(prefix + ".val.bin"));
    return std::make_pair(std::move(train), std::move(val));
  }
  ASSIGN_OR_RETURN(const MegatronData md, LoadMegatronData(prefix));
  auto split = SplitMegatronData(md, val_fraction);
  if (!split.ok()) {
    return absl::Status(split.status().code(),
                        absl::StrCat("Megatron dataset ", prefix, ": ", split.status().message()));
  }
  if (verbose) {
    std::printf(
        "data: Megatron dataset %s: %lld documents, %lld tokens; the last %lld tokens "
        "(val_fraction %g) validate\n",
        prefix.c_str(), static_cast<long long>(md.document_starts.size()),
        static_cast<long long>(md.tokens.size()), static_cast<long long>(split->second.size()),
        val_fraction);
  }
  return std::move(*split);
}

}  // namespace

absl::StatusOr<TrainingData> LoadTrainingData(const TrainConfig& tc, int vocab_size, bool verbose) {
  // One prefix or a weighted blend of them (models/data_blend.h), each `eellm data`'s token files
  // or a Megatron dataset split here.
  ASSIGN_OR_RETURN(const std::vector<BlendPart> blend, ParseDataBlend(tc.data));
  std::vector<TokenDataset> train_parts, val_parts;
  std::vector<double> weights;
  bool megatron = false;
  for (const BlendPart& part : blend) {
    ASSIGN_OR_RETURN(auto split, LoadPrefix(part.prefix, tc.val_fraction, verbose));
    megatron |= IsMegatronPrefix(part.prefix);
    if (absl::Status s = split.first.Validate(tc.seq_len); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("training data ", part.prefix, ": ", s.message()));
    }
    for (const TokenDataset* d : {&split.first, &split.second}) {
      // (uint16 ids are all below a vocabulary of 65,536: no pass over the data needed)
      if (d->width() == 2 && vocab_size >= 65536) continue;
      if (const int64_t t = d->MaxToken(); t >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", t, " in ", part.prefix, " is outside the model vocab_size ", vocab_size));
      }
    }
    train_parts.push_back(std::move(split.first));
    val_parts.push_back(std::move(split.second));
    weights.push_back(part.weight);
  }
  TokenDataset val = BlendedDataset::BlendValidation(
      val_parts, weights, int64_t{tc.eval_batches} * tc.batch_size, tc.seq_len);
  if (verbose && blend.size() > 1) {
    std::string parts;
    for (size_t i = 0; i < blend.size(); ++i) {
      absl::StrAppendFormat(&parts, "%s%.3f x %s (%lld tokens)", i ? ", " : "", blend[i].weight,
                            blend[i].prefix, static_cast<long long>(train_parts[i].size()));
    }
    std::printf("data: a blend of %zu: %s\n", blend.size(), parts.c_str());
  }
  RETURN_IF_ERROR(val.Validate(tc.seq_len));
  if (val.NumSequentialBatches(tc.batch_size, tc.seq_len) < 1) {
    // Evaluate() would average over zero batches and report a loss of 0.
    return absl::InvalidArgumentError(absl::StrCat(
        "validation data ", tc.data, megatron || blend.size() > 1 ? "" : ".val.bin", " has ",
        val.size(), " tokens, too few for one evaluation batch of ", tc.batch_size, " x ",
        tc.seq_len, " (needs at least ", int64_t{tc.batch_size} * tc.seq_len + 1, "); raise ",
        megatron ? "the train config's val_fraction" : "--val_fraction in `eellm data`",
        " or lower batch_size or seq_len"));
  }
  return TrainingData{BlendedDataset(std::move(train_parts), weights), std::move(val)};
}

}  // namespace eellm
