// Shim for the CUDA emulation in tests: the cuBLASLt calls of engine/cuda (lt_gemm.cc), on
// OpenBLAS. D = alpha op(A) op(B) + beta C, column-major as in cuBLASLt, with bf16 or fp32
// operands (bf16 read exactly, fp32 accumulation as the tensor cores do), an fp32 or bf16 D
// rounded once, and the epilogues lt_gemm.cc uses: BIAS (a vector of D's type over D's rows,
// added before the rounding), BGRADB (D's column sums of op(B) over k, fp32, written),
// GELU_AUX(_BIAS) (D = gelu(x) and the aux matrix = x, x the product plus the bias, each rounded
// once to D's type) and DGELU (D = product * gelu'(aux), the product rounded to D's type
// first, as an H200's cuBLASLt does with a bf16 D), with the GELU's tanh form of
// engine/cuda's kernels (cuBLASLt does not document its form; the GPU parity tests compare it
// against the CPU's). Only what lt_gemm.cc sets is modelled; the attribute sizes are checked as
// cuBLASLt checks them.
#pragma once

#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_emulation.h"

struct cublasLtContext {};
using cublasLtHandle_t = cublasLtContext*;
struct cublasLtMatmulDescOpaque_t {
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  int32_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  uint32_t epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
  const void* bias = nullptr;
  void* aux = nullptr;
  int64_t aux_ld = 0;
};
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
struct cublasLtMatrixLayoutOpaque_t {
  cudaDataType type = CUDA_R_32F;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
};
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
struct cublasLtMatmulPreferenceOpaque_t {
  uint64_t workspace = 0;
};
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
};
enum cublasLtEpilogue_t {
  CUBLASLT_EPILOGUE_DEFAULT = 1,
  CUBLASLT_EPILOGUE_BIAS = 4,
  CUBLASLT_EPILOGUE_GELU_AUX = 160,
  CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 164,
  CUBLASLT_EPILOGUE_DGELU = 192,
  CUBLASLT_EPILOGUE_BGRADB = 512,
};
enum cublasLtReductionScheme_t {
  CUBLASLT_REDUCTION_SCHEME_NONE = 0,
  CUBLASLT_REDUCTION_SCHEME_INPLACE = 1,
  CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE = 2,
  CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE = 4,
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  *h = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t c,
                                               cudaDataType scale) {
  if (scale != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
  *d = new cublasLtMatmulDescOpaque_t;
  (*d)->compute = c;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                                     cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, size_t size) {
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
      if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(attr == CUBLASLT_MATMUL_DESC_TRANSA ? &d->trans_a : &d->trans_b, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->epilogue, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      if (size != sizeof(void*)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->bias, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
      if (size != sizeof(void*)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->aux, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
      if (size != sizeof(int64_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->aux_ld, buf, size);
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType type,
                                                 uint64_t rows, uint64_t cols, int64_t ld) {
  if (ld < static_cast<int64_t>(rows) || ld < 1) return CUBLAS_STATUS_INVALID_VALUE;
  *l = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  *p = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(
    cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
    size_t size) {
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
    if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&p->workspace, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  }
  return size == sizeof(uint32_t) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

namespace eellm_emu {
// Whether the epilogue is one of the GELU ones (with an aux matrix).
inline bool LtGelu(cublasLtMatmulDesc_t d) {
  return d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX ||
         d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || d->epilogue == CUBLASLT_EPILOGUE_DGELU;
}
// Whether the descriptor and layouts describe a problem this shim (and lt_gemm.cc's use of
// cuBLASLt) supports: bf16 A and B, fp32 compute, D of fp32 or bf16 with C's layout, shapes
// that agree, BGRADB only with an fp32 D.
inline bool LtProblemValid(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                           cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                           cublasLtMatrixLayout_t dd) {
  if (d->compute != CUBLAS_COMPUTE_32F || a->type != CUDA_R_16BF || b->type != CUDA_R_16BF) {
    return false;
  }
  if (c->type != dd->type || c->rows != dd->rows || c->cols != dd->cols || c->ld != dd->ld) {
    return false;
  }
  const uint64_t m = dd->rows, n = dd->cols;
  const uint64_t am = d->trans_a == CUBLAS_OP_N ? a->rows : a->cols;
  const uint64_t ak = d->trans_a == CUBLAS_OP_N ? a->cols : a->rows;
  const uint64_t bk = d->trans_b == CUBLAS_OP_N ? b->rows : b->cols;
  const uint64_t bn = d->trans_b == CUBLAS_OP_N ? b->cols : b->rows;
  if (am != m || bn != n || ak != bk) return false;
  if (d->epilogue == CUBLASLT_EPILOGUE_BGRADB && dd->type != CUDA_R_32F) return false;
  if (LtGelu(d) && (d->aux_ld % 8 != 0 || d->aux_ld < static_cast<int64_t>(m))) return false;
  return d->epilogue == CUBLASLT_EPILOGUE_DEFAULT || d->epilogue == CUBLASLT_EPILOGUE_BIAS ||
         d->epilogue == CUBLASLT_EPILOGUE_BGRADB || LtGelu(d);
}
// GELU (tanh form, as engine/cuda's kernels) and its derivative.
inline float LtGeluOf(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}
inline float LtGeluGrad(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float th = std::tanh(u);
  const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}
// A stored column-major matrix as fp32 values.
inline std::vector<float> LtValues(const void* x, const cublasLtMatrixLayoutOpaque_t& l) {
  std::vector<float> r(static_cast<size_t>(l.ld) * l.cols);
  for (uint64_t col = 0; col < l.cols; ++col)
    for (uint64_t i = 0; i < l.rows; ++i) {
      const size_t at = col * l.ld + i;
      r[at] = l.type == CUDA_R_16BF ? __bfloat162float(static_cast<const __nv_bfloat16*>(x)[at])
                                    : static_cast<const float*>(x)[at];
    }
  return r;
}
}  // namespace eellm_emu

inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd, cublasLtMatmulPreference_t, int requested,
    cublasLtMatmulHeuristicResult_t results[], int* returned) {
  *returned = 0;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  if (!eellm_emu::LtProblemValid(d, a, b, c, dd)) return CUBLAS_STATUS_NOT_SUPPORTED;
  // EELLM_EMU_CUBLASLT=none: no algorithm for anything, as a cuBLASLt without one for a shape,
  // alignment or epilogue would answer (the tests' way to run the callers' fallback).
  const char* mode = std::getenv("EELLM_EMU_CUBLASLT");
  if (mode != nullptr && std::strcmp(mode, "none") == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  // One algorithm (two, alike, when several are asked for: a tuning caller then has a choice to
  // time).
  *returned = requested > 1 ? 2 : 1;
  for (int i = 0; i < *returned; ++i) {
    results[i] = cublasLtMatmulHeuristicResult_t{};
    results[i].state = CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha,
                                     const void* a, cublasLtMatrixLayout_t la, const void* b,
                                     cublasLtMatrixLayout_t lb, const void* beta, const void* c,
                                     cublasLtMatrixLayout_t lc, void* d, cublasLtMatrixLayout_t ld,
                                     const cublasLtMatmulAlgo_t* algo, void*, size_t,
                                     cudaStream_t stream) {
  if (algo == nullptr || !eellm_emu::LtProblemValid(desc, la, lb, lc, ld)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const int m = static_cast<int>(ld->rows), n = static_cast<int>(ld->cols);
  const int k = static_cast<int>(desc->trans_a == CUBLAS_OP_N ? la->cols : la->rows);
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const bool epi_bias =
      desc->epilogue == CUBLASLT_EPILOGUE_BIAS || desc->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
  const bool epi_bgrad = desc->epilogue == CUBLASLT_EPILOGUE_BGRADB;
  const bool epi_gelu = desc->epilogue == CUBLASLT_EPILOGUE_GELU_AUX ||
                        desc->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
  const bool epi_dgelu = desc->epilogue == CUBLASLT_EPILOGUE_DGELU;
  if (!eellm_emu::DeviceOperands(a, b, d) || !eellm_emu::IsDevice(c, 1) ||
      ((epi_bias || epi_bgrad) && !eellm_emu::IsDevice(desc->bias, 1)) ||
      ((epi_gelu || epi_dgelu) && !eellm_emu::IsDevice(desc->aux, 1))) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  // The descriptors are read now, as cuBLASLt does; the product runs when its work completes.
  eellm_emu::Issue(stream, [=, dc = *desc, lac = *la, lbc = *lb, lcc = *lc, ldc = *ld] {
    const cublasLtMatmulDescOpaque_t* desc = &dc;
    const cublasLtMatrixLayoutOpaque_t *la = &lac, *lb = &lbc, *lc = &lcc, *ld = &ldc;
    const std::vector<float> ra = eellm_emu::LtValues(a, *la), rb = eellm_emu::LtValues(b, *lb);
    std::vector<float> acc = eellm_emu::LtValues(c, *lc);     // C, then D before its rounding
    if (be == 0.0f) std::fill(acc.begin(), acc.end(), 0.0f);  // C is not read (NaN stays out)
    if (k > 0) {
      cblas_sgemm(CblasColMajor, eellm_emu::Trans(static_cast<cublasOperation_t>(desc->trans_a)),
                  eellm_emu::Trans(static_cast<cublasOperation_t>(desc->trans_b)), m, n, k, al,
                  ra.data(), static_cast<int>(la->ld), rb.data(), static_cast<int>(lb->ld), be,
                  acc.data(), static_cast<int>(ld->ld));
    } else {
      for (float& v : acc) v *= be;
    }
    const bool bf16_d = ld->type == CUDA_R_16BF;
    // Stores v at element `at` of a matrix of D's type (rounded once); reads one back exactly.
    auto store = [&](void* base, size_t at, float v) {
      if (bf16_d) {
        static_cast<__nv_bfloat16*>(base)[at] = __float2bfloat16(v);
      } else {
        static_cast<float*>(base)[at] = v;
      }
    };
    auto load = [&](const void* base, size_t at) {
      return bf16_d ? __bfloat162float(static_cast<const __nv_bfloat16*>(base)[at])
                    : static_cast<const float*>(base)[at];
    };
    for (int col = 0; col < n; ++col)
      for (int i = 0; i < m; ++i) {
        float v = acc[static_cast<size_t>(col) * ld->ld + i];
        if (epi_bias) v += load(desc->bias, i);
        const size_t aux_at = static_cast<size_t>(col) * desc->aux_ld + i;
        if (epi_gelu) {
          store(desc->aux, aux_at, v);
          v = eellm_emu::LtGeluOf(v);
        }
        if (epi_dgelu) {  // the product in D's type first (bf16: rounded, as on an H200)
          if (bf16_d) v = __bfloat162float(__float2bfloat16(v));
          v *= eellm_emu::LtGeluGrad(load(desc->aux, aux_at));
        }
        store(d, static_cast<size_t>(col) * ld->ld + i, v);
      }
    if (epi_bgrad) {  // sum over k of op(B)'s column j, for each of D's n columns
      auto* grad = static_cast<float*>(const_cast<void*>(desc->bias));
      for (int j = 0; j < n; ++j) {
        double s = 0.0;
        for (int kk = 0; kk < k; ++kk) {
          s += desc->trans_b == CUBLAS_OP_N ? rb[static_cast<size_t>(j) * lb->ld + kk]
                                            : rb[static_cast<size_t>(kk) * lb->ld + j];
        }
        grad[j] = static_cast<float>(s);
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
