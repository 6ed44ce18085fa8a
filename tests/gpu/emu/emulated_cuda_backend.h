// The CUDA backend (engine/cuda, host code and kernels) built for the CPU emulation of CUDA in
// this folder: the same sources, so the backend parity suite can check their logic against the
// CPU backend on machines without a GPU ("emulated-cuda", "emulated-cuda-bf16",
// "emulated-cuda-bf16w").
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"
#include "engine/cuda/make_cuda_backend.h"  // IWYU pragma: keep (GemmShape, GemmTiming)

namespace eellm {

// As MakeCudaBackend (engine/cuda/make_cuda_backend.h), on the one emulated device.
absl::StatusOr<std::unique_ptr<Backend>> MakeEmulatedCudaBackend(int device, bool bf16_gemm,
                                                                 bool bf16_weights = false);
// MakeBackend(name) (engine/backend.h), which also makes "emulated-cuda", "emulated-cuda-bf16"
// and "emulated-cuda-bf16w": the tests' way to name a backend.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackendOrEmulated(absl::string_view name);
// cudaMalloc calls made so far in this process under the emulation (the backend's buffers and
// its internal scratch alike).
int64_t EmulatedCudaMallocCalls();
// Host waits so far under the emulation: calls that block the host (synchronisations, copies to
// the host, synchronous uploads from pageable memory, cudaFree) made while device work they wait
// for was pending, where a GPU would stall the host.
int64_t EmulatedHostWaits();
// As MeasureCudaGemms (the timings mean nothing here; the results are checked).
absl::StatusOr<std::vector<GemmTiming>> MeasureEmulatedCudaGemms(
    const std::vector<GemmShape>& shapes, int reps);

}  // namespace eellm
