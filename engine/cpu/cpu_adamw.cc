// CpuBackend AdamW update (decoupled weight decay, bias-corrected moments) on one fp32 tensor.
#include <cstddef>

#include "engine/core/adamw_update.h"
#include "engine/cpu/cpu_backend.h"

namespace eellm {

void CpuBackend::AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int step) {
  const float inv_bc1 = AdamWInverseBiasCorrection(beta1, step);
  const float inv_bc2 = AdamWInverseBiasCorrection(beta2, step);
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= (size_t{1} << 15))
  for (ptrdiff_t i = 0; i < nn; ++i) {
    AdamWUpdate(p, g, m, v, static_cast<size_t>(i), lr, beta1, beta2, eps, weight_decay, inv_bc1,
                inv_bc2);
  }
}

}  // namespace eellm
