// engine/cuda/cuda_backend_attention.cc built for the CPU emulation of CUDA (see
// cuda_emulation.h, emulated_names.h).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_backend_attention.cc"
// clang-format on
