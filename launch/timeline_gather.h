// Gathers the compute intervals every pipeline stage recorded in one training step onto rank 0
// as a Timeline, so the measured run can be printed beside the cost model's prediction.
#pragma once

#include <vector>

#include "models/pipeline_executor.h"
#include "parallel/parallel_context.h"
#include "parallel/pipeline/simulator.h"

namespace eellm {

// Collects every stage's recorded compute intervals of one step onto stage 0 of data-parallel
// replica 0 (collective over that pipeline group) as a Timeline of the measured run; other
// ranks get an empty Timeline.
Timeline GatherTimeline(const std::vector<BusyInterval>& mine, ParallelContext& ctx, Backend* be);

}  // namespace eellm
