// engine/cuda/cuda_backend.cc built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_backend.cc"
// clang-format on

namespace eellm {
int64_t EmulatedCudaMallocCalls() { return eellm_emu::g_malloc_calls; }
}  // namespace eellm
