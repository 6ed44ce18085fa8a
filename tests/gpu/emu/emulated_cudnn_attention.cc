// engine/cuda/cudnn_attention.cc built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h): without cuDNN, so Create() returns null and the fused kernels run.
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cudnn_attention.cc"
// clang-format on
