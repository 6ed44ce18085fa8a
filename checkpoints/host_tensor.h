// HostTensor: a named fp32 tensor in host memory, the exchange type between the checkpoint
// converters (safetensors reader/writer, Hugging Face naming, exit surgery) and the HDF5 format.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "engine/tensor/tensor.h"

namespace eellm {

struct HostTensor {
  Shape shape;              // row-major
  std::vector<float> data;  // NumElements(shape) values
};

// Tensors by name (ordered, so iteration and files written from it are deterministic).
using HostTensorMap = std::map<std::string, HostTensor>;

}  // namespace eellm
