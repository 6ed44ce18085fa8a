// Shim for the CUDA emulation in tests: the part of cuDNN's API that engine/cuda's attention
// graphs name (cudnn_graph.h, cudnn_attention.cc), so that they build and run on the CPU. The
// graph itself is not built through cuDNN's backend descriptors here: emulated_cudnn_graph.cc
// implements cudnn_graph.h's Graph by recording its tensors and operations and interpreting them
// when the plan is executed. (That cuDNN accepts the graphs, and which engine it picks, is checked
// against the real library by tests/cudnn.)
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_runtime.h"

// (The enumerators' values are the shim's own, not cuDNN's.)
enum cudnnStatus_t {
  CUDNN_STATUS_SUCCESS = 0,
  CUDNN_STATUS_BAD_PARAM = 2000,
  CUDNN_STATUS_NOT_SUPPORTED = 3000,
  CUDNN_STATUS_EXECUTION_FAILED = 5000
};
enum cudnnDataType_t {
  CUDNN_DATA_FLOAT = 0,
  CUDNN_DATA_INT32 = 3,
  CUDNN_DATA_BFLOAT16 = 9,
  CUDNN_DATA_BOOLEAN = 11
};
enum cudnnPointwiseMode_t {
  CUDNN_POINTWISE_ADD = 0,
  CUDNN_POINTWISE_DIV = 6,
  CUDNN_POINTWISE_MUL = 5,
  CUDNN_POINTWISE_SUB = 9,
  CUDNN_POINTWISE_EXP = 103,
  CUDNN_POINTWISE_LOG = 105,
  CUDNN_POINTWISE_IDENTITY = 106,
  CUDNN_POINTWISE_CMP_GE = 504,
  CUDNN_POINTWISE_BINARY_SELECT = 1001,
  CUDNN_POINTWISE_GEN_INDEX = 501
};
enum cudnnReduceTensorOp_t { CUDNN_REDUCE_TENSOR_ADD = 0, CUDNN_REDUCE_TENSOR_MAX = 2 };
// Named by cudnn_graph.h's private members only.
enum cudnnBackendDescriptorType_t { CUDNN_BACKEND_EMULATED_DESCRIPTOR = 0 };
enum cudnnBackendAttributeName_t { CUDNN_ATTR_EMULATED = 0 };
enum cudnnBackendAttributeType_t { CUDNN_TYPE_EMULATED = 0 };
// What a descriptor holds: defined by emulated_cudnn_graph.cc.
struct cudnnBackendDescriptor_st;
using cudnnBackendDescriptor_t = cudnnBackendDescriptor_st*;

struct cudnnContext {
  cudaStream_t stream = nullptr;
};
using cudnnHandle_t = cudnnContext*;

inline cudnnStatus_t cudnnCreate(cudnnHandle_t* h) {
  *h = new cudnnContext;
  return CUDNN_STATUS_SUCCESS;
}
inline cudnnStatus_t cudnnDestroy(cudnnHandle_t h) {
  delete h;
  return CUDNN_STATUS_SUCCESS;
}
inline cudnnStatus_t cudnnSetStream(cudnnHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUDNN_STATUS_SUCCESS;
}
// A version past 9.15, whose backward needs no padding mask for partial key tiles.
inline size_t cudnnGetVersion() { return 91600; }
inline const char* cudnnGetErrorString(cudnnStatus_t s) {
  return s == CUDNN_STATUS_SUCCESS ? "CUDNN_STATUS_SUCCESS (emulated)" : "error (emulated cuDNN)";
}
