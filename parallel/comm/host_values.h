// Reducing a few host numbers (losses, flags, sizes) over a group: the communicators reduce
// device buffers, so the values go through one buffer of the backend.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "parallel/comm/communicator.h"

namespace eellm {

// Sums (or takes the maxima of) `values` over the group (fp32 on the wire).
void SumOverGroup(Communicator* comm, Backend* be, std::vector<double>& values,
                  ReduceOp op = ReduceOp::kSum);

}  // namespace eellm
