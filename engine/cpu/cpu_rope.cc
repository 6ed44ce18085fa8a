// CpuBackend rotary position embedding, "rotate_half" convention (Llama / Hugging Face): for
// i < head_dim / 2 the pair (x[i], x[i + head_dim/2]) is rotated by pos * RopeInvFreq(i)
// (engine/core/rope.h: theta^(-2i/head_dim), scaled for long contexts when asked).
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/core/status.h"
#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

// Rotates the `heads` heads at the start of each of x's n rows (`stride` apart) by sign * angle
// (sign -1: inverse rotation).
void Rotate(float* x, const int32_t* pos, int n, int heads, int head_dim, int stride,
            const RopeParams& rope, double sign) {
  CheckRopeShape(heads, head_dim, stride);
  const int half = head_dim / 2;
  const size_t row = stride;
  std::vector<double> inv_freq(half);  // the same for every token
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = RopeInvFreq(rope, i, head_dim);
  }
  const bool parallel = static_cast<int64_t>(n) * heads * head_dim >= 8192;
#pragma omp parallel for schedule(static) if (parallel)
  for (int t = 0; t < n; ++t) {
    float* xt = x + static_cast<size_t>(t) * row;
    for (int i = 0; i < half; ++i) {
      const double angle = sign * static_cast<double>(pos[t]) * inv_freq[i];
      const float c = static_cast<float>(std::cos(angle));
      const float s = static_cast<float>(std::sin(angle));
      for (int h = 0; h < heads; ++h) {
        float* xh = xt + static_cast<size_t>(h) * head_dim;
        const float a = xh[i];
        const float b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
      }
    }
  }
}

}  // namespace

void CpuBackend::RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim,
                             int stride, const RopeParams& rope) {
  Rotate(x.f32(), pos, n, heads, head_dim, stride, rope, 1.0);
}

void CpuBackend::RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim,
                              int stride, const RopeParams& rope) {
  // The forward is y = R x with R orthogonal, so dx = R^T dy: rotate by the negated angle.
  Rotate(dx.f32(), pos, n, heads, head_dim, stride, rope, -1.0);
}

}  // namespace eellm
