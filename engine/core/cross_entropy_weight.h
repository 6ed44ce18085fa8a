// The weight of one row's softmax cross-entropy gradient (Backend::CrossEntropy and
// CrossEntropyGradRange): one definition for the CPU backend, the CUDA kernels and their CPU
// emulation, so that all of them round it alike.
#pragma once

#include <cstddef>

#include "engine/core/host_device.h"

namespace eellm {

// weights[r] (1 without weights), times the row's max probability `max_prob` with `by_confidence`
// (confidence-weighted exit losses: the probability is a constant of the gradient); one fp32
// product.
EE_HOST_DEVICE inline float CrossEntropyRowWeight(const float* weights, size_t r,
                                                  bool by_confidence, float max_prob) {
  return (weights != nullptr ? weights[r] : 1.0f) * (by_confidence ? max_prob : 1.0f);
}

}  // namespace eellm
