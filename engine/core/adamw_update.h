// AdamW's arithmetic on one element (decoupled weight decay, bias-corrected moments): one
// definition for the CPU backend, the CUDA kernels and their CPU emulation alike.
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr (m / (1 - b1^step) / (sqrt(v / (1 - b2^step)) + eps) + weight_decay p).
#pragma once

#include <cmath>
#include <cstddef>

#include "engine/core/host_device.h"

namespace eellm {

// 1 / (1 - beta^step), computed in double and rounded once.
inline float AdamWInverseBiasCorrection(float beta, int step) {
  return static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta), step)));
}

// Element i of p, m, v from gradient g; inv_bc1, inv_bc2 from AdamWInverseBiasCorrection.
EE_HOST_DEVICE inline void AdamWUpdate(float* p, const float* g, float* m, float* v, size_t i,
                                       float lr, float beta1, float beta2, float eps,
                                       float weight_decay, float inv_bc1, float inv_bc2) {
  const float gi = g[i];
  const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
  const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  const float m_hat = mi * inv_bc1;
  const float v_hat = vi * inv_bc2;
  p[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p[i]);
}

}  // namespace eellm
