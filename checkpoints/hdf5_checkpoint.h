// One eellm HDF5 tensor file: writing blocks of tensors (whole tensors or tensor-parallel
// shards) with their checksums and positions, and reading them back verified. A single-rank
// checkpoint is one such file; a sharded checkpoint (sharded_checkpoint.h) is one per writing
// rank plus a top-level file that indexes them.
//
// File format "eellm-hdf5", version 2 (version 1 files, which are the same without the
// position attributes, still load):
//   /                       root attributes:
//                             format          string "eellm-hdf5"
//                             format_version  int64 2
//                             config          string, the model config as JSON text
//                             step            int64, optimizer steps taken
//                             shards          (top-level files of sharded checkpoints only)
//                                             string, JSON array of the shard files' names;
//                                             such a file's /model and /optimizer datasets are
//                                             virtual datasets over the shard files' blocks
//   /attrs                  group; one string attribute per CheckpointMeta::attrs entry
//   /model/<name>           one float32 (little-endian) dataset per tensor, named by its global
//                           name verbatim ("layers.0.attn.wq.weight"), contiguous; attributes:
//                             crc32         uint32: zlib CRC-32 of the raw little-endian bytes
//                             global_shape  int64[rank], only when the dataset is a block of a
//                             global_start  int64[rank]  larger tensor (tensor-parallel shard)
//   /optimizer/m/<name>     AdamW first moments, same layout as /model (present only when saved)
//   /optimizer/v/<name>     AdamW second moments, likewise
// String attributes are fixed-length, NUL-terminated UTF-8 (h5py returns bytes:
// f.attrs["config"].decode()); fixed length keeps them (up to 64 KiB) in checksummed object
// headers. Reading also accepts variable-length strings (what h5py writes). Groups track link
// creation order, so datasets list in the order written. Tensor files use the HDF5 1.8 object
// format (superblock v2, checksummed metadata), so a corrupted byte gives an error rather than
// garbage or a hang.
//
// Tensor names must be non-empty, contain no '/' and not be ".". Writing is atomic: the file
// is written to `path + ".tmp"`, closed, synced and renamed over `path`.
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
#include "checkpoints/hdf5_util.h"
#include "checkpoints/tensor_slice.h"
#include "engine/backend.h"

namespace eellm {

struct CheckpointMeta {
  std::string config_json;                   // model config as JSON text
  int64_t step = 0;                          // optimizer steps taken
  std::map<std::string, std::string> attrs;  // extra string attributes (train state JSON etc.)
};

// Which group of a tensor file: the model, or the AdamW moments.
enum class TensorGroup { kModel, kAdamM, kAdamV };
const char* TensorGroupPath(TensorGroup g);  // "/model", "/optimizer/m", "/optimizer/v"

// One tensor (or block of one) to write: NumElements(slice.shape) floats each, in host memory or
// in the memory of TensorFileOptions::backend.
struct FileTensor {
  std::string name;
  TensorSlice slice;
  const float* model = nullptr;
  const float* adam_m = nullptr;  // with adam_v: optional, but all tensors or none
  const float* adam_v = nullptr;
  // Instead of adam_m/v: moments of zeros (a frozen tensor's, which no optimizer holds).
  bool zero_moments = false;
  bool has_moments() const { return (adam_m != nullptr && adam_v != nullptr) || zero_moments; }
};

// A whole tensor of a top-level file, stored as an HDF5 virtual dataset over blocks in the
// shard files (so h5py reads f["model"][name][()] as one array).
struct VirtualTensor {
  TensorGroup group = TensorGroup::kModel;
  std::string name;
  Shape global_shape;
  struct Source {
    std::string file;  // shard file name, relative to the top-level file's directory
    TensorSlice slice;
  };
  std::vector<Source> sources;
};

struct TensorFileOptions {
  // Top-level files of sharded checkpoints: the shard files' names (root attribute "shards")
  // and the virtual datasets over them. Such a file holds no tensor data itself and uses the
  // HDF5 1.10 format (virtual datasets need it).
  std::vector<std::string> shards;
  std::vector<VirtualTensor> virtual_tensors;
  // When set, the tensors' pointers are this backend's device memory, copied to the host one
  // tensor at a time through one staging buffer.
  Backend* backend = nullptr;
  // Tests: fail (as if the process died) after writing this many tensors; < 0 = never.
  int fail_after_tensors = -1;
};

// Writes `tensors` and `meta` to `path` atomically (parent directories are created).
absl::Status WriteTensorFile(const std::string& path, const CheckpointMeta& meta,
                             const std::vector<FileTensor>& tensors,
                             const TensorFileOptions& options = {});

// An open tensor file: its metadata, its table of contents, and verified reads.
class TensorFile {
 public:
  struct Entry {
    std::string name;
    TensorSlice slice;  // whole tensor unless the dataset carries a position
  };

  // Opens `path` read-only and checks the format and version (errors as described above).
  static absl::StatusOr<TensorFile> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const CheckpointMeta& meta() const { return meta_; }
  // Shard files named by a top-level file (empty for a self-contained file).
  const std::vector<std::string>& shards() const { return shards_; }
  // The /model datasets in the order written, with their positions (listed lazily on first
  // call; only valid for self-contained and shard files).
  absl::StatusOr<std::vector<Entry>> Entries();
  bool HasGroup(TensorGroup g) const;
  // Reads dataset `name` of `g` whole into `out`, after checking that it holds f32 values of
  // `expected` shape, and verifies its checksum.
  absl::Status Read(TensorGroup g, const std::string& name, const Shape& expected,
                    std::vector<float>& out);

 private:
  std::string path_;
  h5::Handle file_;
  CheckpointMeta meta_;
  std::vector<std::string> shards_;
};

// Reads the config, step and extra attributes of a tensor file without touching the tensors.
absl::StatusOr<CheckpointMeta> ReadTensorFileMeta(const std::string& path);

// Flushes the closed file or directory at `path` to stable storage.
absl::Status SyncPath(const std::string& path);

}  // namespace eellm
