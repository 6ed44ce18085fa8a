// parallel/comm/nccl_communicator.cc built for the CPU emulation of CUDA and NCCL (see nccl.h,
// cuda_emulation.h, emulated_names.h); used by emulated_nccl.h.
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "parallel/comm/nccl_communicator.cc"
// clang-format on
