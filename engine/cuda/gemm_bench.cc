// MeasureCudaGemms (make_cuda_backend.h): one GEMM shape timed in fp32, FAST_16BF on fp32 data,
// bf16 operands with fp32 output, and bf16 throughout.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/make_cuda_backend.h"

namespace eellm {
namespace {

#define RETURN_IF_CUDA(call)                                                        \
  do {                                                                              \
    const cudaError_t e = (call);                                                   \
    if (e != cudaSuccess)                                                           \
      return absl::InternalError(absl::StrCat(#call, ": ", cudaGetErrorString(e))); \
  } while (0)
#define RETURN_IF_CUBLAS(call)                                                                  \
  do {                                                                                          \
    const cublasStatus_t e = (call);                                                            \
    if (e != CUBLAS_STATUS_SUCCESS) {                                                           \
      return absl::InternalError(absl::StrCat(#call, ": cuBLAS status ", static_cast<int>(e))); \
    }                                                                                           \
  } while (0)

// Device buffers freed at scope exit.
struct DeviceBuffers {
  std::vector<void*> ptrs;
  ~DeviceBuffers() {
    for (void* p : ptrs) cudaFree(p);
  }
  template <typename T>
  absl::StatusOr<T*> Make(size_t n) {
    void* p = nullptr;
    RETURN_IF_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptrs.push_back(p);
    return static_cast<T*>(p);
  }
};

}  // namespace

absl::StatusOr<std::vector<GemmTiming>> MeasureCudaGemms(const std::vector<GemmShape>& shapes,
                                                         int reps) {
  cublasHandle_t h = nullptr;
  RETURN_IF_CUBLAS(cublasCreate(&h));
  struct HandleGuard {
    cublasHandle_t h;
    ~HandleGuard() { cublasDestroy(h); }
  } guard{h};
  cudaEvent_t start = nullptr, stop = nullptr;
  RETURN_IF_CUDA(cudaEventCreate(&start));
  RETURN_IF_CUDA(cudaEventCreate(&stop));
  struct EventGuard {
    cudaEvent_t a, b;
    ~EventGuard() {
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
  } events{start, stop};
  std::vector<GemmTiming> out;
  for (const GemmShape& s : shapes) {
    if (s.m <= 0 || s.n <= 0 || s.k <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad GEMM shape ", s.what, ": ", s.m, " x ", s.n, " x ", s.k));
    }
    const size_t na = static_cast<size_t>(s.m) * s.k, nb = static_cast<size_t>(s.n) * s.k;
    const size_t nc = static_cast<size_t>(s.m) * s.n;
    DeviceBuffers mem;
    ASSIGN_OR_RETURN(float* a, mem.Make<float>(na));
    ASSIGN_OR_RETURN(float* b, mem.Make<float>(nb));
    ASSIGN_OR_RETURN(float* c, mem.Make<float>(nc));
    ASSIGN_OR_RETURN(uint16_t * ab, mem.Make<uint16_t>(na));
    ASSIGN_OR_RETURN(uint16_t * bb, mem.Make<uint16_t>(nb));
    ASSIGN_OR_RETURN(uint16_t * cb, mem.Make<uint16_t>(nc));
    RETURN_IF_CUDA(cuda::FillUniform(a, na, 1, 1.0f, nullptr));
    RETURN_IF_CUDA(cuda::FillUniform(b, nb, 2, 1.0f, nullptr));
    RETURN_IF_CUDA(cuda::ToBf16(ab, a, na, nullptr));
    RETURN_IF_CUDA(cuda::ToBf16(bb, b, nb, nullptr));
    const float one = 1.0f, zero = 0.0f;
    // Row-major C = A B^T is column-major C^T = B A^T: (op T on B stored n x k row-major).
    enum Variant { kFp32, kFast, kBf16In, kBf16All };
    auto call = [&](Variant v) -> cublasStatus_t {
      cublasSetMathMode(h, v == kFp32 ? CUBLAS_PEDANTIC_MATH : CUBLAS_DEFAULT_MATH);
      if (v == kFp32) {
        return cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, s.n, s.m, s.k, &one, b, s.k, a, s.k, &zero,
                           c, s.n);
      }
      const bool bf16 = v != kFast;
      return cublasGemmEx(
          h, CUBLAS_OP_T, CUBLAS_OP_N, s.n, s.m, s.k, &one, bf16 ? static_cast<const void*>(bb) : b,
          bf16 ? CUDA_R_16BF : CUDA_R_32F, s.k, bf16 ? static_cast<const void*>(ab) : a,
          bf16 ? CUDA_R_16BF : CUDA_R_32F, s.k, &zero, v == kBf16All ? static_cast<void*>(cb) : c,
          v == kBf16All ? CUDA_R_16BF : CUDA_R_32F, s.n,
          v == kFast ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    GemmTiming t;
    t.shape = s;
    std::vector<float> ref(nc), got(nc);
    std::vector<uint16_t> got16(nc);
    double scale = 0;
    for (Variant v : {kFp32, kFast, kBf16In, kBf16All}) {
      for (int i = 0; i < 2; ++i) RETURN_IF_CUBLAS(call(v));  // warm-up (and the result)
      RETURN_IF_CUDA(cudaDeviceSynchronize());
      if (v == kBf16All) {
        RETURN_IF_CUDA(cudaMemcpy(got16.data(), cb, nc * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < nc; ++i) got[i] = Bf16ToFloat(bf16{got16[i]});
      } else {
        RETURN_IF_CUDA(
            cudaMemcpy(v == kFp32 ? ref.data() : got.data(), c, nc * 4, cudaMemcpyDeviceToHost));
      }
      if (v == kFp32) {
        for (float x : ref) scale = std::max(scale, std::fabs(static_cast<double>(x)));
      } else {
        for (size_t i = 0; i < nc; ++i) {
          t.max_rel_diff = std::max(t.max_rel_diff, std::fabs(double{got[i]} - ref[i]) / scale);
        }
      }
      std::vector<float> ms;
      for (int r = 0; r < std::max(reps, 1); ++r) {
        RETURN_IF_CUDA(cudaEventRecord(start, nullptr));
        RETURN_IF_CUBLAS(call(v));
        RETURN_IF_CUDA(cudaEventRecord(stop, nullptr));
        RETURN_IF_CUDA(cudaEventSynchronize(stop));
        float elapsed_ms = 0;
        RETURN_IF_CUDA(cudaEventElapsedTime(&elapsed_ms, start, stop));
        ms.push_back(elapsed_ms);
      }
      std::sort(ms.begin(), ms.end());
      const double median_s = std::max(ms[ms.size() / 2], 1e-6f) * 1e-3;
      const double tflops = 2.0 * s.m * s.n * s.k / median_s / 1e12;
      (v == kFp32     ? t.fp32
       : v == kFast   ? t.fast_bf16
       : v == kBf16In ? t.bf16_in
                      : t.bf16_all) = tflops;
    }
    out.push_back(t);
  }
  return out;
}

}  // namespace eellm
