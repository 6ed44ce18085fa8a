// CpuBackend activations: GELU (GPT-2 tanh approximation) and SwiGLU, forward and backward.
#include <cmath>
#include <cstddef>

#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

constexpr size_t kParallelMin = size_t{1} << 14;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

inline float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

void CpuBackend::GeluForward(Operand out_op, const float* x, size_t n) {
  float* out = out_op.f32();
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    out[i] = 0.5f * xi * (1.0f + std::tanh(u));
  }
}

void CpuBackend::GeluBackward(float* dx, const float* dout, const float* x, size_t n) {
  // d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    const float th = std::tanh(u);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * xi * xi);
    const float grad = 0.5f * (1.0f + th) + 0.5f * xi * (1.0f - th * th) * du;
    dx[i] = grad * dout[i];  // dx may alias dout: read before write, same index
  }
}

void CpuBackend::SwiGluForward(Operand out_op, const float* gate, const float* up, size_t n) {
  float* out = out_op.f32();
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float gi = gate[i];
    out[i] = gi * Sigmoid(gi) * up[i];
  }
}

void CpuBackend::SwiGluBackward(float* dgate, float* dup, const float* dout, const float* gate,
                                const float* up, size_t n) {
  // silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float gi = gate[i];
    const float ui = up[i];
    const float dy = dout[i];
    const float s = Sigmoid(gi);
    const float dsilu = s * (1.0f + gi * (1.0f - s));
    dgate[i] = dy * ui * dsilu;
    dup[i] = dy * gi * s;
  }
}

}  // namespace eellm
