// CUDA_CHECK / CUBLAS_CHECK: abort with the failing call's text and the error when a CUDA
// runtime or cuBLAS(Lt) call fails (the host code of engine/cuda).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "engine/core/status.h"

#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    const cudaError_t eellm_err = (call);                                                  \
    EE_CHECK(eellm_err == cudaSuccess, #call, " failed: ", cudaGetErrorString(eellm_err)); \
  } while (0)

#define CUBLAS_CHECK(call)                                                         \
  do {                                                                             \
    const cublasStatus_t eellm_err = (call);                                       \
    EE_CHECK(eellm_err == CUBLAS_STATUS_SUCCESS, #call, " failed: cuBLAS status ", \
             static_cast<int>(eellm_err));                                         \
  } while (0)
