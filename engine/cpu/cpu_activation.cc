// CpuBackend activations: GELU (GPT-2 tanh approximation) and SwiGLU, forward and backward.
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "engine/core/dropout.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/cpu_exp.h"

namespace eellm {
namespace {

constexpr size_t kParallelMin = size_t{1} << 14;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// SwiGLU works in chunks: the sigmoids of a chunk's gates first (vectorised exp), then the
// elementwise formulas.
constexpr size_t kChunk = 1024;

// s[j] = sigmoid(g[j]) = 1 / (1 + exp(-g[j])) for j < len.
void Sigmoids(float* s, const float* g, size_t len) {
  cpu::Exp(s, g, len, -1.0f, 0.0f);
  for (size_t j = 0; j < len; ++j) s[j] = 1.0f / (1.0f + s[j]);
}

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
  const ptrdiff_t chunks = static_cast<ptrdiff_t>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t c = 0; c < chunks; ++c) {
    const size_t i0 = static_cast<size_t>(c) * kChunk, len = std::min(kChunk, n - i0);
    float s[kChunk];
    Sigmoids(s, gate + i0, len);
    for (size_t j = 0; j < len; ++j) out[i0 + j] = gate[i0 + j] * s[j] * up[i0 + j];
  }
}

void CpuBackend::SwiGluBackward(Operand dgate_op, Operand dup_op, ConstOperand dout_op,
                                ConstOperand gate_op, ConstOperand up_op, size_t n) {
  float *dgate = dgate_op.f32(), *dup = dup_op.f32();
  const float *dout = dout_op.f32(), *gate = gate_op.f32(), *up = up_op.f32();
  // silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
  const ptrdiff_t chunks = static_cast<ptrdiff_t>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (ptrdiff_t c = 0; c < chunks; ++c) {
    const size_t i0 = static_cast<size_t>(c) * kChunk, len = std::min(kChunk, n - i0);
    float sig[kChunk];
    Sigmoids(sig, gate + i0, len);
    for (size_t j = 0; j < len; ++j) {
      const size_t i = i0 + j;
      const float gi = gate[i], ui = up[i], dy = dout[i], s = sig[j];
      const float dsilu = s * (1.0f + gi * (1.0f - s));
      dgate[i] = dy * ui * dsilu;  // may alias an input: read before write, same index
      dup[i] = dy * gi * s;
    }
  }
}

void CpuBackend::DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                            uint64_t key, int64_t row0) {
  const uint32_t threshold = DropoutThreshold(p);
  const float scale = 1.0f / (1.0f - p);
  const uint64_t base = static_cast<uint64_t>(row0) * static_cast<uint64_t>(c);
  const ptrdiff_t total = static_cast<ptrdiff_t>(n) * c;
#pragma omp parallel for schedule(static) if (static_cast <size_t>(total) >= kParallelMin)
  for (ptrdiff_t i = 0; i < total; ++i) {
    const float kept =
        DropoutKeep(key, base + static_cast<uint64_t>(i), threshold) ? branch[i] * scale : 0.0f;
    out[i] = (x != nullptr ? x[i] : 0.0f) + kept;
  }
}

void CpuBackend::DropoutBackward(float* dbranch, const float* dout, int n, int c, float p,
                                 uint64_t key, int64_t row0) {
  DropoutAdd(dbranch, nullptr, dout, n, c, p, key, row0);
}

}  // namespace eellm
