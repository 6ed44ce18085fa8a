// CpuBackend AdamW update (decoupled weight decay, bias-corrected moments) on one fp32 tensor.
#include <cmath>
#include <cstddef>

#include "engine/cpu/cpu_backend.h"

namespace eellm {

void CpuBackend::AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int step) {
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), step);
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), step);
  const float inv_bc1 = static_cast<float>(1.0 / bc1);
  const float inv_bc2 = static_cast<float>(1.0 / bc2);
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= (size_t{1} << 15))
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi * inv_bc1;
    const float v_hat = vi * inv_bc2;
    p[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * p[i]);
  }
}

}  // namespace eellm
