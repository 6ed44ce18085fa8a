// Sharded checkpoints: every rank that holds a unique part of the model writes only that part
// (its tensor-parallel blocks of its pipeline stages' tensors, with their AdamW moments) to its
// own HDF5 file, and rank 0 adds a top-level file whose virtual datasets present whole tensors
// (h5py: f["model"][name][()]). Loading under any (tp, pp, dp) layout assembles each rank's
// blocks from whichever stored blocks overlap them, verifying every checksum.
//
// On disk (<root> is the run's checkpoint directory):
//   <root>/latest                        text: the name of the newest complete step directory
//   <root>/step_00000600/model.h5        top-level file: config, step, attributes, the list of
//                                        shard files, virtual datasets over them
//   <root>/step_00000600/shard_tp0_pp0.h5, shard_tp1_pp0.h5, ...  one per writing rank
//                                        (and any a save's write_more adds: shard_rest_l<N>.h5)
// A save writes into step_XXXXXXXX.tmp/, syncs, renames it to step_XXXXXXXX/ and only then
// rewrites `latest` (via a temporary file and rename), so a save that dies midway leaves the
// previous checkpoint as `latest`, intact. Older step directories beyond keep_last are removed
// after the new one is complete.
//
// A single self-contained tensor file (one rank, or a converter's output) is a checkpoint too:
// every loader accepts a root directory, a step directory, a top-level file or such a file.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoints/hdf5_checkpoint.h"
#include "engine/tensor/param_store.h"
#include "parallel/comm/communicator.h"

namespace eellm {

// The top-level file of a step directory.
inline constexpr char kCheckpointTopFile[] = "model.h5";

// One model chunk of this rank (a pipeline stage, or a virtual stage when interleaving).
struct ChunkState {
  ParamStore* params = nullptr;  // shapes are this rank's blocks (ParamInfo::split_dim)
  // AdamW moment arenas laid out like the parameter arena (device memory), or null: then
  // saving writes no optimizer state and loading reads none.
  float* adam_m = nullptr;
  float* adam_v = nullptr;
  // The arena offset adam_m/v start at (ParamStore::grad_lo(): the optimizer of a frozen model
  // holds moments for its trainable tail only). Tensors below it, and every tensor that is not
  // trainable, are saved with moments of zeros and their stored moments are not loaded.
  size_t moments_lo = 0;
  // Without moment arenas: save every tensor's moments as zeros all the same.
  bool zero_moments = false;
  int tp_rank = 0, tp_size = 1;
  // Saving: tensors this chunk does not write because another chunk or rank writes the same
  // values (copies of tied embeddings, tensors replicated over tensor-parallel ranks).
  std::vector<std::string> skip;
};

struct ShardedSaveOptions {
  int keep_last = 0;  // step directories to keep, the new one included (0 = keep all)
  // Tests: this rank's shard write fails after writing this many tensors (< 0 = never).
  int fail_after_tensors = -1;
  // The backend whose memory `world` communicates (the one the communicator was made with):
  // the ranks' agreement flags go through its buffers. Null: host memory.
  Backend* backend = nullptr;
  // Called on every rank after its own shard, with the staging directory: writes more shards
  // (WriteShard) before the ranks agree that the checkpoint is complete. Null: none.
  std::function<absl::Status(const std::string& staging_dir)> write_more;
};

// Collective over `world`: every rank calls it. `shard_name` ("tp0_pp1") names this rank's
// file; ranks with nothing to write (data-parallel replicas) pass "" and no chunks. Every rank
// returns the same status: the step directory, or the first error (a rank whose own write
// failed reports its own error). meta.step names the step directory.
absl::StatusOr<std::string> SaveShardedCheckpoint(
    const std::string& root, const CheckpointMeta& meta, const std::vector<ChunkState>& chunks,
    const std::string& shard_name, Communicator& world, const ShardedSaveOptions& options = {});

// The steps of a save, for callers that run the ranks' parts themselves (tests, converters
// writing a checkpoint for a layout they do not run): create StagingDir(root, step), write
// every rank's shard with WriteShard, then PublishCheckpoint once.
std::string StagingDir(const std::string& root, int64_t step);
absl::Status WriteShard(const std::string& staging_dir, const std::string& shard_name,
                        const CheckpointMeta& meta, const std::vector<ChunkState>& chunks,
                        int fail_after_tensors = -1);
// Checks that the shards tile every tensor, writes the top-level file, renames the staging
// directory to the step directory, points `latest` at it and prunes beyond keep_last.
absl::StatusOr<std::string> PublishCheckpoint(const std::string& root, const CheckpointMeta& meta,
                                              int keep_last);

// The top-level (or self-contained) file of the checkpoint at `path`: a root directory (via
// its `latest`), a step directory (its model.h5), or a file.
absl::StatusOr<std::string> ResolveCheckpoint(const std::string& path);

// Config, step and attributes of the checkpoint at `path` (any form ResolveCheckpoint takes).
absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path);

// Fills every chunk's parameters (and moments, where the chunk has arenas) from the checkpoint
// at `path`, whatever layout it was saved under. All tensors are located and their global
// shapes checked before anything is read; errors name the file and the tensor.
absl::Status LoadCheckpoint(const std::string& path, const std::vector<ChunkState>& chunks);

// Single process, whole tensors: writes `params` (and the moments when given, laid out from
// params.grad_lo() as ChunkState::moments_lo says) to one self-contained file at `path`, and
// loads one.
absl::Status SaveCheckpoint(const std::string& path, const ParamStore& params,
                            const CheckpointMeta& meta, const float* adam_m = nullptr,
                            const float* adam_v = nullptr);
absl::Status LoadCheckpoint(const std::string& path, ParamStore& params, float* adam_m = nullptr,
                            float* adam_v = nullptr);

// Whether the checkpoint at `path` holds AdamW state (every shard has it).
absl::StatusOr<bool> CheckpointHasOptimizerState(const std::string& path);

// Names and global shapes of the model tensors of a checkpoint, in saved order.
absl::StatusOr<std::vector<std::pair<std::string, Shape>>> ListCheckpointTensors(
    const std::string& path);

}  // namespace eellm
