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

void CpuBackend::GeluForward(Operand out_op, ConstOperand x_op, size_t n) {
  float* out = out_op.f32();
  const float* x = x_op.f32();
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    out[i] = 0.5f * xi * (1.0f + std::tanh(u));
  }
}

void CpuBackend::GeluBackward(Operand dx_op, ConstOperand dout_op, ConstOperand x_op, size_t n) {
  float* dx = dx_op.f32();
  const float *dout = dout_op.f32(), *x = x_op.f32();
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

void CpuBackend::SwiGluForward(Operand out_op, ConstOperand gate_op, ConstOperand up_op, size_t n) {
  float* out = out_op.f32();
  const float *gate = gate_op.f32(), *up = up_op.f32();
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) {
    const float gi = gate[i];
    out[i] = gi * Sigmoid(gi) * up[i];
  }
}

void CpuBackend::SwiGluBackward(Operand dgate_op, Operand dup_op, ConstOperand dout_op,
                                ConstOperand gate_op, ConstOperand up_op, size_t n) {
  float *dgate = dgate_op.f32(), *dup = dup_op.f32();
  const float *dout = dout_op.f32(), *gate = gate_op.f32(), *up = up_op.f32();
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
