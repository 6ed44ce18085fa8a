// tests/gpu/warp_mma_check.cu built for the CPU emulation of CUDA (see cuda_emulation.h).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "tests/gpu/warp_mma_check.cu"
// clang-format on
