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

void CpuBackend::SwiGluForward(Operand out_op, ConstOperand gate_op, ConstOperand up_op, int rows,
                               int cols, int stride) {
  CheckSwiGluShape(rows, cols, stride);
  float* out = out_op.f32();
  const float *gate = gate_op.f32(), *up = up_op.f32();
  const ptrdiff_t per_row = (cols + kChunk - 1) / kChunk, tasks = per_row * rows;
#pragma omp parallel for schedule(static) if (static_cast <size_t>(rows) * cols >= kParallelMin)
  for (ptrdiff_t task = 0; task < tasks; ++task) {
    const size_t r = task / per_row, j0 = (task % per_row) * kChunk;
    const size_t len = std::min(kChunk, static_cast<size_t>(cols) - j0);
    const float* g = gate + r * stride + j0;
    const float* u = up + r * stride + j0;
    float* o = out + r * cols + j0;
    float s[kChunk];
    Sigmoids(s, g, len);
    for (size_t j = 0; j < len; ++j) o[j] = g[j] * s[j] * u[j];
  }
}

void CpuBackend::SwiGluBackward(Operand dgate_op, Operand dup_op, ConstOperand dout_op,
                                ConstOperand gate_op, ConstOperand up_op, int rows, int cols,
                                int stride) {
  CheckSwiGluShape(rows, cols, stride);
  float *dgate = dgate_op.f32(), *dup = dup_op.f32();
  const float *dout = dout_op.f32(), *gate = gate_op.f32(), *up = up_op.f32();
  // silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
  const ptrdiff_t per_row = (cols + kChunk - 1) / kChunk, tasks = per_row * rows;
#pragma omp parallel for schedule(static) if (static_cast <size_t>(rows) * cols >= kParallelMin)
  for (ptrdiff_t task = 0; task < tasks; ++task) {
    const size_t r = task / per_row, j0 = (task % per_row) * kChunk;
    const size_t len = std::min(kChunk, static_cast<size_t>(cols) - j0);
    const size_t at = r * stride + j0;  // gate, up, dgate, dup
    const float* dy = dout + r * cols + j0;
    float sig[kChunk];
    Sigmoids(sig, gate + at, len);
    for (size_t j = 0; j < len; ++j) {
      const size_t i = at + j;
      const float gi = gate[i], ui = up[i], s = sig[j];
      const float dsilu = s * (1.0f + gi * (1.0f - s));
      dgate[i] = dy[j] * ui * dsilu;  // may alias an input: read before write, same index
      dup[i] = dy[j] * gi * s;
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
