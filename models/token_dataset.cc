// TokenDataset batch fetching (random and sequential windows).
#include "models/token_dataset.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"
#include "models/token_file.h"

namespace eellm {
TokenDataset::TokenDataset(std::vector<int32_t> tokens) {
  auto owned = std::make_shared<const std::vector<int32_t>>(std::move(tokens));
  data_ = reinterpret_cast<const uint8_t*>(owned->data());
  size_ = static_cast<int64_t>(owned->size());
  owner_ = std::move(owned);
}

TokenDataset::TokenDataset(std::shared_ptr<const void> owner, const uint8_t* data, int width,
                           int64_t size)
    : owner_(std::move(owner)), data_(data), width_(width), size_(size) {
  EE_CHECK((width == 2 || width == 4) && size >= 0, "token view of width ", width, ", size ", size);
}

int32_t TokenDataset::at(int64_t i) const {
  if (width_ == 2) {
    uint16_t v;
    std::memcpy(&v, data_ + 2 * i, 2);
    return v;
  }
  int32_t v;
  std::memcpy(&v, data_ + 4 * i, 4);
  return v;
}

TokenDataset TokenDataset::Slice(int64_t begin, int64_t end) const {
  EE_CHECK(0 <= begin && begin <= end && end <= size_, "slice [", begin, ", ", end, ") of ", size_,
           " tokens");
  return TokenDataset(owner_, data_ + begin * width_, width_, end - begin);
}

int64_t TokenDataset::MaxToken() const {
  int64_t m = -1;
  if (width_ == 2) {
    for (int64_t i = 0; i < size_; ++i) m = std::max<int64_t>(m, at(i));
  } else {
    for (int64_t i = 0; i < size_; ++i) m = std::max<int64_t>(m, static_cast<uint32_t>(at(i)));
  }
  return m;
}

absl::StatusOr<TokenDataset> TokenDataset::Load(const std::string& path) {
  ASSIGN_OR_RETURN(std::vector<int32_t> tokens, ReadTokenFile(path));
  return TokenDataset(std::move(tokens));
}

absl::Status TokenDataset::Validate(int seq) const {
  if (seq <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("sequence length must be positive, got ", seq));
  }
  if (size() <= seq) {
    return absl::FailedPreconditionError(
        absl::StrCat("dataset has ", size(), " tokens, too few for sequence length ", seq,
                     " (need more than ", seq, ": ", seq, " inputs plus one target)"));
  }
  return absl::OkStatus();
}

void TokenDataset::CopyWindow(int64_t offset, int seq, int32_t* inputs, int32_t* targets) const {
  for (int i = 0; i < seq; ++i) {
    inputs[i] = at(offset + i);
    targets[i] = at(offset + i + 1);
  }
}

void TokenDataset::RandomBatch(uint64_t seed, int64_t step, int batch, int seq, int32_t* inputs,
                               int32_t* targets) const {
  RandomRows(seed, step, 0, batch, seq, inputs, targets);
}

void TokenDataset::RandomRows(uint64_t seed, int64_t step, int64_t first_row, int rows, int seq,
                              int32_t* inputs, int32_t* targets) const {
  EE_CHECK(seq > 0 && size() > seq, "dataset of ", size(), " tokens, seq ", seq);
  EE_CHECK(rows > 0 && first_row >= 0, "rows ", rows, ", first_row ", first_row);
  // A bijective mix: distinct (seed, step) pairs give distinct streams.
  Rng rng(SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(step)));
  // Each row takes exactly one draw, so skipping to first_row keeps rows aligned.
  for (int64_t r = 0; r < first_row; ++r) rng.Next();
  const uint64_t num_offsets = static_cast<uint64_t>(size() - seq);
  for (int r = 0; r < rows; ++r) {
    const int64_t offset = static_cast<int64_t>(rng.Below(num_offsets));
    CopyWindow(offset, seq, inputs + static_cast<int64_t>(r) * seq,
               targets + static_cast<int64_t>(r) * seq);
  }
}

int64_t TokenDataset::NumSequentialBatches(int batch, int seq) const {
  EE_CHECK(batch > 0 && seq > 0, "batch ", batch, ", seq ", seq);
  if (size() <= seq) return 0;
  const int64_t windows = (size() - 1) / seq;
  return windows / batch;
}

void TokenDataset::SequentialBatch(int64_t index, int batch, int seq, int32_t* inputs,
                                   int32_t* targets) const {
  EE_CHECK(index >= 0 && index < NumSequentialBatches(batch, seq), "sequential batch ", index,
           " of ", NumSequentialBatches(batch, seq));
  for (int r = 0; r < batch; ++r) {
    const int64_t window = index * batch + r;
    CopyWindow(window * seq, seq, inputs + static_cast<int64_t>(r) * seq,
               targets + static_cast<int64_t>(r) * seq);
  }
}

}  // namespace eellm
