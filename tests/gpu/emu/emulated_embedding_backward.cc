// engine/cuda/embedding_backward.cu built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h; CUB's sort from cub/device/device_radix_sort.cuh here).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/embedding_backward.cu"
// clang-format on
