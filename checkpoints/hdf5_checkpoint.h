// Single-rank HDF5 checkpoints: saves and loads a ParamStore (and optionally the AdamW moment
// arenas) together with the model config, step count and extra string attributes, in a plain
// HDF5 file that h5py and other HDF5 tools can read.
//
// File format "eellm-hdf5", version 1:
//   /                       root attributes:
//                             format          string "eellm-hdf5"
//                             format_version  int64 1
//                             config          string, the model config as JSON text
//                             step            int64, optimizer steps taken
//   /attrs                  group; one string attribute per CheckpointMeta::attrs entry
//   /model/<name>           one float32 (little-endian) dataset per parameter, named by the
//                           parameter's global name verbatim ("layers.0.attn.wq.weight"), with
//                           its global shape (a scalar dataspace for shape []), contiguous
//                           layout; attribute crc32 (uint32): zlib CRC-32 of the dataset's raw
//                           little-endian bytes in row-major order
//   /optimizer/m/<name>     AdamW first moments, same layout as /model (present only when saved)
//   /optimizer/v/<name>     AdamW second moments, likewise
// String attributes are fixed-length, NUL-terminated UTF-8 (h5py returns bytes:
// f.attrs["config"].decode()); fixed length keeps them (up to 64 KiB) in checksummed object
// headers, unlike variable-length strings in the unchecksummed global heap. Reading also accepts
// variable-length strings (what h5py writes). Groups track link creation order, so datasets list
// in parameter order. Files use the HDF5 1.8 object format (superblock v2, checksummed
// metadata), so a corrupted byte gives an error rather than garbage or a hang; any HDF5 >= 1.8
// reader, h5py included, opens them, and f["model"][name][()] is the whole array.
//
// Parameter names must be non-empty, contain no '/' and not be ".". Saving is atomic: the file
// is written to `path + ".tmp"`, closed, synced and renamed over `path`; missing parent
// directories are created. Loading matches datasets to parameters by name; datasets in the file
// with no matching parameter are ignored.
//
// Errors are absl statuses naming the file (and the tensor, with expected and found shapes,
// where relevant): NotFound for a missing file or tensor, InvalidArgument for a non-HDF5 file,
// a non-eellm HDF5 file, an unsupported version, or a shape/dtype mismatch, DataLoss for a
// truncated or corrupt file or a checksum mismatch. HDF5's own error printing is silenced while
// these functions run. Not thread-safe (the HDF5 library is not).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tensor/param_store.h"

namespace eellm {

struct CheckpointMeta {
  std::string config_json;                   // model config as JSON text
  int64_t step = 0;                          // optimizer steps taken
  std::map<std::string, std::string> attrs;  // extra string attributes (train state JSON etc.)
};

// Optional AdamW state: arenas with the same layout as ParamStore (offsets from ParamInfo).
struct OptimizerArenas {
  const float* m = nullptr;
  const float* v = nullptr;
};

// Writes `params` (allocated; copied from device memory via its backend) and `meta` to `path`.
// Non-null adam_m / adam_v (device arenas of params.size() floats laid out like the parameter
// arena, on the same backend) are saved under /optimizer/m and /optimizer/v.
absl::Status SaveCheckpoint(const std::string& path, const ParamStore& params,
                            const CheckpointMeta& meta, const float* adam_m = nullptr,
                            const float* adam_v = nullptr);

// Reads the config, step and extra attributes without touching the tensors.
absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path);

// Loads every parameter of `params` (already declared and allocated) by name; each dataset must
// exist with the same shape and dtype f32, and its checksum must match. If adam_m/adam_v are
// non-null (device arenas laid out like the parameter arena), loads the optimizer state too
// (error if absent). All shapes and dtypes are checked before anything is written; if a later
// read or checksum fails, the destination contents are unspecified.
absl::Status LoadCheckpoint(const std::string& path, ParamStore& params, float* adam_m = nullptr,
                            float* adam_v = nullptr);

// Names and shapes of all model tensors in a checkpoint (for inspection/tools), in the order
// they were saved.
absl::StatusOr<std::vector<std::pair<std::string, Shape>>> ListCheckpointTensors(
    const std::string& path);

}  // namespace eellm
