// The NCCL communicator (parallel/comm/nccl_communicator.cc) built for the CPU emulation of
// CUDA and NCCL in this folder (NCCL over MPI on emulated device memory): layout tests can run
// their tensor- and data-parallel groups on it (EELLM_LAYOUT_COMM=nccl).
#pragma once

#include "parallel/comm/communicator.h"
#include "parallel/parallel_context.h"

namespace eellm {

// As UseNcclForModelParallel (parallel/comm/nccl_communicator.h).
void UseEmulatedNcclForModelParallel(ParallelContext* ctx, Communicator* host_world);

}  // namespace eellm
