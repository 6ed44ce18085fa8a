// Safetensors: reader and writer for Hugging Face's .safetensors tensor files
// (https://github.com/huggingface/safetensors) and for model directories holding one
// model.safetensors or shards listed by model.safetensors.index.json. Values are converted to
// fp32 HostTensors when read and from them (F32, F16 or BF16, round to nearest even) when written.
//
// File layout: 8 bytes little-endian u64 N, N bytes of UTF-8 JSON header (an object starting with
// '{', possibly padded with spaces), then the byte buffer. Each header key except "__metadata__"
// (a string -> string map) is a tensor: {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
// offsets relative to the buffer. The reader checks everything the spec requires (no overlaps,
// no holes, sizes that match shapes, no duplicate keys) and never reads out of bounds on any
// input; integer and bool dtypes (and F64) are rejected as unsupported.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoints/host_tensor.h"

namespace eellm {

// Stored element type of a safetensors tensor.
enum class StDtype { kF32, kF16, kBF16 };

// "F32", "F16", "BF16" (the safetensors spelling).
const char* StDtypeName(StDtype dtype);
// Bytes per element: 4 or 2.
int StDtypeSize(StDtype dtype);
// Accepts "F32"/"f32"/"fp32"/"float32", "F16"/"f16"/"fp16"/"float16" and
// "BF16"/"bf16"/"bfloat16"; anything else is InvalidArgument naming the value.
absl::StatusOr<StDtype> ParseStDtype(absl::string_view name);

// IEEE binary16 conversions: FloatToF16Bits rounds to nearest even, produces subnormals, turns
// overflow (>= 65520 in magnitude) into infinity and keeps NaN a (quiet) NaN.
uint16_t FloatToF16Bits(float f);
float F16BitsToFloat(uint16_t h);

struct SafetensorsFile {
  HostTensorMap tensors;                        // Values converted to fp32.
  std::map<std::string, StDtype> dtypes;        // Each tensor's stored dtype.
  std::map<std::string, std::string> metadata;  // "__metadata__".
};

// Parses a whole file image (for tests and fuzzing); `name` is used in error messages. Malformed
// input gives DataLoss (truncated file, sizes that disagree) or InvalidArgument (a bad header),
// with a message naming `name` and, where relevant, the tensor.
absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes, const std::string& name);
// Reads and parses one .safetensors file (NotFound when it cannot be opened).
absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path);
// A Hugging Face model directory or file: `path` is a .safetensors file, a *.index.json file, or
// a directory holding model.safetensors (preferred, as in transformers) or
// model.safetensors.index.json (sharded: {"metadata": {...}, "weight_map": {tensor: file}}, file
// names relative to the index's directory). Every tensor listed in the index must be found in its
// file, each file's tensors must all be mapped to that file by the weight_map, and no tensor may
// appear twice. The metadata of a sharded model is the union of its shards' "__metadata__" (the
// first shard in name order wins on a conflicting key).
absl::StatusOr<SafetensorsFile> ReadSafetensorsModel(const std::string& path);

// Writes `tensors` converted to `dtype` (round to nearest even; fp16 with correct subnormals,
// inf and NaN) with optional metadata: tensors in name order, contiguous, header padded with
// spaces to a multiple of 8 bytes. Atomic: writes path + ".tmp", fsyncs it and renames it.
// A tensor whose data size disagrees with its shape, a tensor named "__metadata__" or a name
// that is not valid UTF-8 is InvalidArgument; I/O failures are Internal.
absl::Status WriteSafetensorsFile(const std::string& path, const HostTensorMap& tensors,
                                  StDtype dtype,
                                  const std::map<std::string, std::string>& metadata = {});
// Writes a Hugging Face model directory (created if missing): model.safetensors when all tensor
// data fits in max_shard_bytes (0 = no limit), else model-00001-of-0000N.safetensors ... (tensors
// in name order, a new shard started when the next tensor would exceed the limit, so a tensor
// larger than the limit gets a shard of its own) plus model.safetensors.index.json with
// metadata.total_size = bytes of tensor data. `metadata` goes into every file's "__metadata__".
// A stale model.safetensors or index of the other layout is removed, so the directory reads back
// as written; stale shards with other names are left alone.
absl::Status WriteSafetensorsModel(const std::string& dir, const HostTensorMap& tensors,
                                   StDtype dtype, int64_t max_shard_bytes = 0,
                                   const std::map<std::string, std::string>& metadata = {});

}  // namespace eellm
