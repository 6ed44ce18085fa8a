// engine/cuda/host_staging.cc built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/host_staging.cc"
// clang-format on
