// engine/cuda/cudnn_attention.cc built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h), with the cuDNN shim of this folder (cudnn.h): its graphs run on the
// interpreter of emulated_cudnn_graph.cc, so what they compute is checked against the CPU backend
// (EELLM_CUDNN_ATTENTION=0 turns them off, as on a GPU, and the fused kernels run instead).
#include "tests/gpu/emu/emulated_names.h"
#define EELLM_HAVE_CUDNN 1
// clang-format off
#include "engine/cuda/cudnn_attention.cc"
// clang-format on
