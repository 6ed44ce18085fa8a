// TensorBoard event files (Megatron's --tensorboard-dir): the scalars a run logs, in TensorFlow's
// record format, so that `tensorboard --logdir DIR` plots them. Each record is the data's
// length (uint64, little-endian), its masked CRC-32C, the data (an `Event` protocol buffer:
// wall_time = 1, step = 2, file_version = 3, summary = 5 holding `Value`s of tag = 1 and
// simple_value = 2) and the data's masked CRC-32C. The few fields are encoded here, without a
// protobuf library; ReadTensorBoardScalars reads them back (tests, tools).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace eellm {

// CRC-32C (Castagnoli), as TensorFlow's records use it before masking.
uint32_t Crc32c(const void* data, size_t n);

class TensorBoardEvents {
 public:
  TensorBoardEvents() = default;  // writes nothing
  // A new event file in `dir` (created): events.out.tfevents.<seconds>.<host>.<pid>, starting
  // with the file-version event. A resumed run writes a new file; TensorBoard drops the older
  // file's points past the step a run restarts from.
  static absl::StatusOr<TensorBoardEvents> Open(const std::string& dir);

  // One event at `step` holding these scalars (tag, value); flushed.
  void Write(int64_t step, const std::vector<std::pair<std::string, float>>& scalars);
  const std::string& path() const { return path_; }

 private:
  void Record(const std::string& data);
  std::shared_ptr<std::FILE> file_;
  std::string path_;
};

struct TensorBoardScalar {
  std::string tag;
  int64_t step = 0;
  float value = 0;
};
// Every scalar of an event file, in order; fails naming the file and offset at a record whose
// length or CRC is wrong or whose event cannot be decoded.
absl::StatusOr<std::vector<TensorBoardScalar>> ReadTensorBoardScalars(const std::string& path);

}  // namespace eellm
