// Scalar schedules: the learning rate (linear warm-up, then a decay to a minimum in one of
// Megatron-LM's styles) and warm-up ramps (linear or cosine) used for early-exit loss weights.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace eellm {

// Megatron's --lr-decay-style.
enum class LrDecay { kCosine, kLinear, kConstant, kInverseSquareRoot };
// "cosine", "linear", "constant" or "inverse-square-root"; errors name the style.
absl::StatusOr<LrDecay> ParseLrDecay(const std::string& name);

struct LrSchedule {
  double max_lr = 1e-3, min_lr = 0;
  int warmup = 0;       // steps of linear warm-up from 0
  int decay_steps = 1;  // the step (counted from 0) at which the decay reaches min_lr
  LrDecay decay = LrDecay::kCosine;
};

// LR at optimizer step `step` (0-based): max_lr (step + 1) / warmup during the warm-up; then,
// with progress p = (step - warmup) / (decay_steps - warmup), min_lr + (max_lr - min_lr) c with
// c = (1 + cos(pi p)) / 2 (cosine), 1 - p (linear) or 1 (constant), or for inverse-square-root
// max_lr sqrt(max(warmup, 1) / (step + 1)) (not below min_lr); min_lr from decay_steps on
// (constant: max_lr throughout).
double LearningRate(int step, const LrSchedule& s);

// Ramp from `start` to `end` over `iters` steps (linear or cosine); `end` from step `iters` on.
double Ramp(int step, int iters, double start, double end, bool cosine);

}  // namespace eellm
