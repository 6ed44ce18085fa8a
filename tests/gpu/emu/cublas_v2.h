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
  void* workspace = nullptr;  // a user workspace (null: cuBLAS's own pool)
};
using cublasHandle_t = cublasContext*;
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_16BF = 14 };

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
  h->workspace = nullptr;  // as cuBLAS does: a new stream goes back to the default pool
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) {
  return CUBLAS_STATUS_SUCCESS;
}
// The workspace must be device memory of the size given.
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* workspace, size_t bytes) {
  if (bytes > 0 && !eellm_emu::IsDevice(workspace, bytes)) {
    eellm_emu::Misuse("cublasSetWorkspace: the workspace is not device memory of that size");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  h->workspace = workspace;
  return CUBLAS_STATUS_SUCCESS;
}

namespace eellm_emu {
// Whether A, B and C are device memory (reported when not, as cuBLAS would fault). Every GEMM
// checks it, then issues its product on its stream (Issue: deferred on the legacy stream).
inline bool DeviceOperands(const void* a, const void* b, const void* c) {
  if (IsDevice(a, 1) && IsDevice(b, 1) && IsDevice(c, 1)) return true;
  Misuse("a cuBLAS operand is not device memory");
  return false;
}
inline CBLAS_TRANSPOSE Trans(cublasOperation_t op) {
  return op == CUBLAS_OP_T ? CblasTrans : CblasNoTrans;
}
}  // namespace eellm_emu

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                  int m, int n, int k, const float* alpha, const float* a, int lda,
                                  const float* b, int ldb, const float* beta, float* c, int ldc) {
  if (m <= 0 || n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (!eellm_emu::DeviceOperands(a, b, c)) return CUBLAS_STATUS_INVALID_VALUE;
  eellm_emu::Issue(h->stream, [=, al = *alpha, be = *beta] {
    cblas_sgemm(CblasColMajor, eellm_emu::Trans(ta), eellm_emu::Trans(tb), m, n, k, al, a, lda, b,
                ldb, be, c, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}

namespace eellm_emu {
// cublasGemmEx's product, when it runs: C = al * op(A) op(B) + be * C, with the operands rounded to
// bf16 when `round` (or stored so).
inline void GemmEx(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float al,
                   const void* a, cudaDataType atype, int lda, const void* b, cudaDataType btype,
                   int ldb, float be, void* c, cudaDataType ctype, int ldc, bool round) {
  // The operands as fp32 values (stored shapes: A m x k, or k x m transposed; B k x n or n x k),
  // rounded to bf16 where the data or the compute type says so.
  auto operand = [&](const void* x, cudaDataType type, int rows, int cols, int ld) {
    std::vector<float> r(static_cast<size_t>(ld) * cols);
    for (int col = 0; col < cols; ++col)
      for (int i = 0; i < rows; ++i) {
        const size_t at = static_cast<size_t>(col) * ld + i;
        const float v = type == CUDA_R_16BF
                            ? __bfloat162float(static_cast<const __nv_bfloat16*>(x)[at])
                            : static_cast<const float*>(x)[at];
        r[at] = round ? __bfloat162float(__float2bfloat16(v)) : v;
      }
    return r;
  };
  const auto ra = operand(a, atype, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda);
  const auto rb = operand(b, btype, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb);
  if (ctype == CUDA_R_32F) {
    cblas_sgemm(CblasColMajor, Trans(ta), Trans(tb), m, n, k, al, ra.data(), lda, rb.data(), ldb,
                be, static_cast<float*>(c), ldc);
    return;
  }
  // bf16 output: compute in fp32, round once.
  auto* cb = static_cast<__nv_bfloat16*>(c);
  std::vector<float> rc(static_cast<size_t>(ldc) * n);
  for (int col = 0; col < n; ++col)
    for (int i = 0; i < m; ++i) {
      rc[static_cast<size_t>(col) * ldc + i] =
          __bfloat162float(cb[static_cast<size_t>(col) * ldc + i]);
    }
  cblas_sgemm(CblasColMajor, Trans(ta), Trans(tb), m, n, k, al, ra.data(), lda, rb.data(), ldb, be,
              rc.data(), ldc);
  for (int col = 0; col < n; ++col)
    for (int i = 0; i < m; ++i) {
      cb[static_cast<size_t>(col) * ldc + i] =
          __float2bfloat16(rc[static_cast<size_t>(col) * ldc + i]);
    }
}
}  // namespace eellm_emu

inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void* alpha, const void* a,
                                   cudaDataType atype, int lda, const void* b, cudaDataType btype,
                                   int ldb, const void* beta, void* c, cudaDataType ctype, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (m <= 0 || n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (!eellm_emu::DeviceOperands(a, b, c)) return CUBLAS_STATUS_INVALID_VALUE;
  if (atype != btype) return CUBLAS_STATUS_INVALID_VALUE;  // as cuBLAS: no mixed operand types
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  eellm_emu::Issue(h->stream, [=] {
    eellm_emu::GemmEx(ta, tb, m, n, k, al, a, atype, lda, b, btype, ldb, be, c, ctype, ldc,
                      compute == CUBLAS_COMPUTE_32F_FAST_16BF);
  });
  return CUBLAS_STATUS_SUCCESS;
}
