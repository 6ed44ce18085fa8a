// How a parallel layout maps onto a sharded checkpoint: which tensors each rank's model chunk
// writes (ChunkStateFor), and writing a checkpoint for any (tp, pp) layout from a whole model
// in one process (converters, `eellm convert reshard`).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoints/sharded_checkpoint.h"
#include "models/transformer.h"

namespace eellm {

// The save/load description of `chunk`, held by tensor-parallel rank `tp_rank` of `tp_size`.
// Tensors every tensor-parallel rank holds whole are written by rank 0 only, and copies of the
// word embedding (tied heads on later stages) only by virtual stage 0 (`first_virtual_stage`).
// `m`, `v`: the chunk's moment arenas, or null.
ChunkState ChunkStateFor(Model& chunk, int tp_rank, int tp_size, bool first_virtual_stage,
                         float* m = nullptr, float* v = nullptr);

// One rank's model chunk of a (tp, pp) layout, cut from a whole model, with its moments.
struct LayoutChunk {
  std::unique_ptr<Model> model;
  Buffer adam_m, adam_v;  // empty without optimizer state
  int tp_rank = 0, tp_size = 1, stage = 0;
};

// Every rank's chunk of layout tp x pp (stage-major), cut from `whole` (and its moments `m`,
// `v` in its arena layout, or null).
absl::StatusOr<std::vector<LayoutChunk>> SplitForLayout(Model& whole, const float* m,
                                                        const float* v, int tp, int pp);

// Writes `chunks` as the checkpoint of `root` at meta.step, one shard per chunk, as the ranks
// of a run of that layout would. Returns the step directory.
absl::StatusOr<std::string> WriteLayoutChunks(const std::string& root, const CheckpointMeta& meta,
                                              const std::vector<LayoutChunk>& chunks,
                                              int keep_last = 0);

// Writes the whole model `whole` (tp 1, one stage; moments `m`, `v` in its arena layout or null)
// as the checkpoint of `root` at meta.step, split for `tp` x `pp` ranks (shard_tp{t}_pp{s}.h5),
// exactly as a run of that layout would save it. Returns the step directory.
absl::StatusOr<std::string> WriteCheckpointForLayout(const std::string& root,
                                                     const CheckpointMeta& meta, Model& whole,
                                                     const float* m, const float* v, int tp, int pp,
                                                     int keep_last = 0);

// A run of a model cut after layer `depth` (StageSpec::depth, EE-Tuning) keeps its checkpoints
// whole by copying what it does not hold, layers [depth, num_layers) and the final norm and
// head, from `source` (the whole checkpoint it started from or saved last) into
// `staging_dir`: one shard per layer (shard_rest_l<layer>.h5, the final head with the last
// layer), those with (layer - depth) % writers == writer, one layer in host memory at a time.
// With `moments`, the shards hold AdamW moments too: zeros, as for every frozen tensor (see
// ChunkState::moments_lo). A shard the source directory already holds (a save of such a run)
// is then hard-linked instead (it keeps that save's step in its own attributes; loaders read
// the top-level file's).
absl::Status WriteLayersPastDepth(const std::string& staging_dir, const CheckpointMeta& meta,
                                  const ModelConfig& c, int depth, const std::string& source,
                                  bool moments, int writer, int writers);

}  // namespace eellm
