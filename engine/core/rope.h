// RoPE's rotation frequencies: the base theta and the optional scaling of the low frequencies
// for longer contexts (linear position interpolation; Llama 3.1's "llama3" scheme). One
// definition, compiled for the CPU backend, the CUDA kernels and their CPU emulation alike.
//
// Pair i of a head of size d (0 <= i < d/2) turns by position * inv_freq(i), where the plain
// inv_freq(i) = theta^(-2i/d). Scaling then divides it:
//   linear:  inv_freq / factor (every pair; positions interpolated by factor).
//   llama3:  with wavelength w = 2 pi / inv_freq, low = original_max_positions / low_freq_factor
//            and high = original_max_positions / high_freq_factor:
//            w < high  -> inv_freq (short wavelengths kept),
//            w > low   -> inv_freq / factor,
//            otherwise -> (1 - s) inv_freq / factor + s inv_freq with
//                         s = (original_max_positions / w - low_freq_factor) /
//                             (high_freq_factor - low_freq_factor).
#pragma once

#include <cmath>

#include "engine/core/host_device.h"

namespace eellm {

enum class RopeScalingKind : int { kNone, kLinear, kLlama3 };

struct RopeScaling {
  RopeScalingKind kind = RopeScalingKind::kNone;
  float factor = 1.0f;                // linear, llama3
  float low_freq_factor = 1.0f;       // llama3
  float high_freq_factor = 4.0f;      // llama3
  int original_max_positions = 8192;  // llama3: the context the model was pre-trained on
};

struct RopeParams {
  float theta = 10000.0f;
  RopeScaling scaling;
};

// Angle per position of pair i of a head of size head_dim.
EE_HOST_DEVICE inline double RopeInvFreq(const RopeParams& r, int i, int head_dim) {
  const double inv_freq = pow(static_cast<double>(r.theta), -2.0 * i / head_dim);
  const RopeScaling& s = r.scaling;
  if (s.kind == RopeScalingKind::kLinear) return inv_freq / s.factor;
  if (s.kind != RopeScalingKind::kLlama3) return inv_freq;
  const double wavelength = 6.283185307179586 / inv_freq;
  const double original = s.original_max_positions;
  if (wavelength < original / s.high_freq_factor) return inv_freq;
  if (wavelength > original / s.low_freq_factor) return inv_freq / s.factor;
  const double smooth =
      (original / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  return (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq;
}

}  // namespace eellm
