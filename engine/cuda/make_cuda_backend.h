// The CUDA backend's factory, callable from code that must not include CUDA headers (only
// engine/cuda does). Built when the CUDA toolkit is found (EELLM_HAVE_CUDA).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace eellm {

// A CudaBackend on GPU `device` modulo the number of GPUs (so ranks may share GPUs; pass the
// local rank), or on the current device when `device` < 0; `bf16_gemm`: GEMMs on tensor cores
// with bf16-rounded operands (see CudaBackend::GemmPrecision). Unavailable when no GPU is
// present or the driver cannot be initialised.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device = -1, bool bf16_gemm = false);

}  // namespace eellm
