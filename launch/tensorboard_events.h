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
  // A new event file in `dir` (created): events.out.tfevents.<seconds>.<host>.<pid>.<k> (k
  // counts the files this process opened; an existing file is never overwritten), starting with
  // the file-version event. A run resumed at `first_step` > 0 then writes a session-start event
  // (SessionLog START, field 6) at first_step + 1, on which TensorBoard drops the points of
  // earlier files from that step on: what the run that crashed logged past its checkpoint.
  static absl::StatusOr<TensorBoardEvents> Open(const std::string& dir, int64_t first_step = 0);

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
