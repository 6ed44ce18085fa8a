// Shim for the CUDA emulation in tests: the cuBLAS calls of engine/cuda, on OpenBLAS. GEMMs are
// column-major as in cuBLAS; CUBLAS_COMPUTE_32F_FAST_16BF rounds both operands to bf16 (round to
// nearest even) and accumulates in fp32, as the tensor cores do (see cuda_emulation.h).
#pragma once

#include <cblas.h>

#include <vector>

#include "cuda_bf16.h"
#include "cuda_emulation.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
};
using cublasHandle_t = cublasContext*;
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cudaDataType { CUDA_R_32F = 0 };

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) {
  return CUBLAS_STATUS_SUCCESS;
}

namespace eellm_emu {
inline CBLAS_TRANSPOSE Trans(cublasOperation_t op) {
  return op == CUBLAS_OP_T ? CblasTrans : CblasNoTrans;
}
// The bf16 values of a column-major operand (rows x cols as stored, leading dimension ld).
inline std::vector<float> RoundedToBf16(const float* x, int rows, int cols, int ld) {
  std::vector<float> r(static_cast<size_t>(ld) * cols);
  for (int c = 0; c < cols; ++c)
    for (int i = 0; i < rows; ++i) {
      const size_t at = static_cast<size_t>(c) * ld + i;
      r[at] = __bfloat162float(__float2bfloat16(x[at]));
    }
  return r;
}
}  // namespace eellm_emu

inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m,
                                  int n, int k, const float* alpha, const float* a, int lda,
                                  const float* b, int ldb, const float* beta, float* c, int ldc) {
  if (m <= 0 || n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (!eellm_emu::IsDevice(a, 1) || !eellm_emu::IsDevice(b, 1) || !eellm_emu::IsDevice(c, 1)) {
    eellm_emu::Misuse("a cuBLAS operand is not device memory");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  cblas_sgemm(CblasColMajor, eellm_emu::Trans(ta), eellm_emu::Trans(tb), m, n, k, *alpha, a, lda, b,
              ldb, *beta, c, ldc);
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void* alpha, const void* a,
                                   cudaDataType, int lda, const void* b, cudaDataType, int ldb,
                                   const void* beta, void* c, cudaDataType, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  const auto* fa = static_cast<const float*>(a);
  const auto* fb = static_cast<const float*>(b);
  if (compute != CUBLAS_COMPUTE_32F_FAST_16BF) {
    return cublasSgemm(h, ta, tb, m, n, k, static_cast<const float*>(alpha), fa, lda, fb, ldb,
                       static_cast<const float*>(beta), static_cast<float*>(c), ldc);
  }
  if (m <= 0 || n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (!eellm_emu::IsDevice(a, 1) || !eellm_emu::IsDevice(b, 1) || !eellm_emu::IsDevice(c, 1)) {
    eellm_emu::Misuse("a cuBLAS operand is not device memory");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // Stored shapes: A is m x k (k x m when transposed), B is k x n (n x k when transposed).
  const auto ra =
      eellm_emu::RoundedToBf16(fa, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda);
  const auto rb =
      eellm_emu::RoundedToBf16(fb, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb);
  (void)h;
  cblas_sgemm(CblasColMajor, eellm_emu::Trans(ta), eellm_emu::Trans(tb), m, n, k,
              *static_cast<const float*>(alpha), ra.data(), lda, rb.data(), ldb,
              *static_cast<const float*>(beta), static_cast<float*>(c), ldc);
  return CUBLAS_STATUS_SUCCESS;
}
