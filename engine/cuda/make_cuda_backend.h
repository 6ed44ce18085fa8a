// The CUDA backend's factory, callable from code that must not include CUDA headers (only
// engine/cuda does). Built when the CUDA toolkit is found (EELLM_HAVE_CUDA).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace eellm {

// A CudaBackend on GPU `device` modulo the number of GPUs (so ranks may share GPUs; pass the
// local rank), or on the current device when `device` < 0; `bf16_gemm`: GEMMs on tensor cores
// with bf16-rounded operands (see CudaBackend::GemmPrecision). Unavailable when no GPU is
// present or the driver cannot be initialised. `bf16_weights` (with bf16_gemm): GEMMs take bf16
// copies of the registered weights and bf16-converted activations (CudaBackend::GemmPrecision).
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device = -1, bool bf16_gemm = false,
                                                         bool bf16_weights = false);

// The number of CUDA GPUs this process sees (0 when none or the driver cannot be initialised).
int CudaDeviceCount();
// The PCI bus id of GPU `device` modulo the count (the GPU MakeCudaBackend(device) takes), or ""
// when there is none: it names a physical GPU whatever CUDA_VISIBLE_DEVICES renumbers.
std::string CudaDeviceBusId(int device);

}  // namespace eellm

namespace eellm {

// One GEMM shape of a model: row-major C[m, n] = A[m, k] B[n, k]^T (a Linear: m tokens, n
// outputs, k inputs).
struct GemmShape {
  std::string what;
  int m = 0, n = 0, k = 0;
};
// TFLOP/s of one shape in each precision the CUDA backend could use, and the largest
// |C - C_fp32| / max|C_fp32| of the reduced-precision results (a check that each call computed
// the same product).
struct GemmTiming {
  GemmShape shape;
  double fp32 = 0;          // cuBLAS SGEMM, no TF32 (the "cuda" backend)
  double fast_bf16 = 0;     // fp32 data, CUBLAS_COMPUTE_32F_FAST_16BF ("cuda-bf16" today)
  double bf16_in = 0;       // bf16 operands, fp32 output
  double bf16_all = 0;      // bf16 operands and output
  double max_rel_diff = 0;  // worst of the three reduced-precision results against fp32
};
// Times each shape on the current GPU (median of `reps` calls after warm-up, CUDA events) on
// hashed uniform data. For `eellm bench train`: whether converting operands to bf16 first would
// pay against cuBLAS's own conversion.
absl::StatusOr<std::vector<GemmTiming>> MeasureCudaGemms(const std::vector<GemmShape>& shapes,
                                                         int reps = 10);

}  // namespace eellm
