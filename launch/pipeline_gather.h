// Gathers a pipeline-split model onto stage 0: every stage of the first data-parallel replica
// sends its parameters and AdamW moments to stage 0, which assembles the whole model by tensor
// name (for single-file checkpoints and for comparing layouts in tests).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "models/transformer.h"
#include "parallel/parallel_context.h"
#include "parallel/pipeline/simulator.h"

namespace eellm {

struct GatheredModel {
  std::unique_ptr<Model> model;  // whole model; null on ranks that do not assemble it
  Buffer m, v;                   // AdamW moments in the whole model's arena layout
};

// Collective over the pipeline group of data-parallel rank 0 (other ranks return at once).
// `m` and `v` are this stage's full-layout moment arenas (may be null: then zeros).
absl::StatusOr<GatheredModel> GatherPipeline(Model& stage, const float* m, const float* v,
                                             ParallelContext& ctx);
// Interleaved pipelines: this rank's model chunks (chunk c holds virtual stage c * pp + s of
// pp * chunks.size()) with their moment arenas (`m`, `v` empty or one per chunk; entries may
// be null). Every rank of the pipeline group must pass the same number of chunks.
absl::StatusOr<GatheredModel> GatherPipeline(const std::vector<Model*>& chunks,
                                             const std::vector<const float*>& m,
                                             const std::vector<const float*>& v,
                                             ParallelContext& ctx);

// Collective over the tensor-parallel group: the whole (tp = 1) model chunk assembled from this
// group's shards of `shard` (and of its moment arenas m, v when non-null, into *out_m, *out_v).
// Every rank of the group gets the result.
absl::StatusOr<std::unique_ptr<Model>> UnshardTensorParallel(Model& shard, StageSpec stage,
                                                             const float* m, const float* v,
                                                             ParallelContext& ctx, Buffer* out_m,
                                                             Buffer* out_v);

// Collects every stage's recorded compute intervals of one step onto stage 0 of data-parallel
// replica 0 (collective over that pipeline group) as a Timeline of the measured run; other
// ranks get an empty Timeline.
Timeline GatherTimeline(const std::vector<BusyInterval>& mine, ParallelContext& ctx, Backend* be);

}  // namespace eellm
