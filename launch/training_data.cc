#include "launch/training_data.h"

#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/status.h"
#include "models/epoch_sampler.h"
#include "models/megatron_data.h"
#include "nlohmann/json.hpp"

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
  auto train = BlendedDataset::Create(std::move(train_parts), weights, tc.sampling == "epochs");
  if (!train.ok()) {
    return absl::Status(train.status().code(),
                        absl::StrCat("train data \"", tc.data, "\": ", train.status().message()));
  }
  return TrainingData{*std::move(train), std::move(val)};
}

void TrainingRows(const BlendedDataset& train, const TrainConfig& tc, int step,
                  int64_t step_samples, int64_t first_row, int rows, int32_t* inputs,
                  int32_t* targets) {
  if (tc.sampling == "epochs") {
    train.EpochRows(tc.seed, step_samples + first_row, rows, tc.seq_len, inputs, targets);
  } else {
    train.RandomRows(tc.seed, step, first_row, rows, tc.seq_len, inputs, targets);
  }
}

int64_t ConsumedSamples(const std::map<std::string, std::string>& checkpoint_attrs, int step,
                        int batch_size) {
  int64_t samples = int64_t{step} * batch_size;
  if (auto it = checkpoint_attrs.find("train_state"); it != checkpoint_attrs.end()) {
    const nlohmann::json st = nlohmann::json::parse(it->second, nullptr, false);
    if (st.is_object() && st.contains("data") && st["data"].is_object()) {
      const nlohmann::json& n = st["data"].value("consumed_samples", nlohmann::json());
      if (n.is_number_integer() && n.get<int64_t>() >= 0) samples = n.get<int64_t>();
    }
  }
  return samples;
}

std::string SamplingSummary(const BlendedDataset& train, const TrainConfig& tc, int start,
                            int64_t start_samples) {
  if (tc.sampling != "epochs") {
    return absl::StrFormat("sampling: windows of %d tokens at random offsets (with replacement)",
                           tc.seq_len + 1);
  }
  const int64_t end_samples = start_samples + int64_t{tc.steps - start} * tc.batch_size;
  std::string parts;
  for (int d = 0; d < train.num_parts(); ++d) {
    absl::StrAppendFormat(&parts, "%s%s%lld windows, epochs %.3f to %.3f", d ? "; " : "",
                          train.num_parts() > 1 ? absl::StrCat("part ", d + 1, ": ") : "",
                          static_cast<long long>(WindowsOf(train.part(d).size(), tc.seq_len)),
                          train.EpochsOf(d, start_samples, tc.seq_len),
                          train.EpochsOf(d, end_samples, tc.seq_len));
  }
  return absl::StrFormat(
      "sampling: epochs of windows of %d tokens (each once per epoch), samples %lld to %lld: %s",
      tc.seq_len + 1, static_cast<long long>(start_samples), static_cast<long long>(end_samples),
      parts);
}

}  // namespace eellm
