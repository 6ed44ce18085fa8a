// TokenDataset: a token stream (in memory, or a view of a mapped file) that serves
// [batch, seq] next-token-prediction batches. Random batches are a pure function of (seed, step),
// so any step's batch can be regenerated exactly on resume; sequential batches walk the data in
// order for validation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace eellm {

class TokenDataset {
 public:
  TokenDataset() = default;
  explicit TokenDataset(std::vector<int32_t> tokens);
  // A view of `size` tokens stored `width` bytes each (2: uint16, 4: int32; little-endian) at
  // `data`, which `owner` keeps alive (e.g. a MappedFile): nothing is copied.
  TokenDataset(std::shared_ptr<const void> owner, const uint8_t* data, int width, int64_t size);

  // Reads a token file written by WriteTokenFile (models/token_file.h).
  static absl::StatusOr<TokenDataset> Load(const std::string& path);

  int64_t size() const { return size_; }
  int width() const { return width_; }  // bytes a token takes in storage: 2 or 4
  int32_t at(int64_t i) const;
  // Tokens [begin, end), sharing the storage.
  TokenDataset Slice(int64_t begin, int64_t end) const;
  // The largest token id, ids read as unsigned 32-bit (a negative int32 id is then over 2^31;
  // -1 when empty): one pass over the data.
  int64_t MaxToken() const;

  // OK when windows of `seq` inputs plus one target fit: seq > 0 and size() > seq.
  absl::Status Validate(int seq) const;

  // Fills row-major [batch, seq] `inputs` and `targets` (targets[i] = the token after
  // inputs[i]) with windows at uniformly random offsets in [0, size() - seq). The offsets come
  // from an Rng seeded from (seed, step) only, so the batch is reproducible. Row r uses the
  // r-th draw, so a batch of B rows is the first B rows of any larger batch for the same
  // (seed, step). Requires Validate(seq).ok() and batch > 0.
  void RandomBatch(uint64_t seed, int64_t step, int batch, int seq, int32_t* inputs,
                   int32_t* targets) const;

  // Rows [first_row, first_row + rows) of the random batch for (seed, step): lets each
  // data-parallel rank fetch its slice of a global batch. RandomBatch(...) is
  // RandomRows(seed, step, 0, batch, ...).
  void RandomRows(uint64_t seed, int64_t step, int64_t first_row, int rows, int seq,
                  int32_t* inputs, int32_t* targets) const;

  // Copies the seq + 1 tokens at `offset` into one row of inputs and targets (shifted by one).
  void CopyWindow(int64_t offset, int seq, int32_t* inputs, int32_t* targets) const;

  // Sequential batches: window w has inputs tokens[w*seq, (w+1)*seq) and targets shifted by one;
  // batch i holds windows i*batch .. i*batch + batch - 1. Windows never overlap and leftover
  // windows that do not fill a batch are dropped. Zero when size() <= seq.
  int64_t NumSequentialBatches(int batch, int seq) const;
  // Requires 0 <= index < NumSequentialBatches(batch, seq).
  void SequentialBatch(int64_t index, int batch, int seq, int32_t* inputs, int32_t* targets) const;

 private:
  std::shared_ptr<const void> owner_;  // keeps data_ alive
  const uint8_t* data_ = nullptr;
  int width_ = 4;
  int64_t size_ = 0;
};

}  // namespace eellm
