#include "engine/optim/schedules.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace eellm {

absl::StatusOr<LrDecay> ParseLrDecay(const std::string& name) {
  if (name == "cosine") return LrDecay::kCosine;
  if (name == "linear") return LrDecay::kLinear;
  if (name == "constant") return LrDecay::kConstant;
  if (name == "inverse-square-root") return LrDecay::kInverseSquareRoot;
  return absl::InvalidArgumentError(absl::StrCat(
      "lr_decay_style \"", name, "\" is not cosine, linear, constant or inverse-square-root"));
}

double LearningRate(int step, const LrSchedule& s) {
  if (s.warmup > 0 && step < s.warmup) return s.max_lr * (step + 1) / s.warmup;
  switch (s.decay) {
    case LrDecay::kConstant:
      return s.max_lr;
    case LrDecay::kInverseSquareRoot:
      return std::max(
          s.min_lr, s.max_lr * std::sqrt(static_cast<double>(std::max(s.warmup, 1)) / (step + 1)));
    case LrDecay::kCosine:
    case LrDecay::kLinear:
      break;
  }
  if (step >= s.decay_steps) return s.min_lr;
  const int span = std::max(1, s.decay_steps - s.warmup);
  const double p = static_cast<double>(step - s.warmup) / span;
  const double c = s.decay == LrDecay::kCosine ? 0.5 * (1.0 + std::cos(M_PI * p)) : 1.0 - p;
  return s.min_lr + (s.max_lr - s.min_lr) * c;
}

double Ramp(int step, int iters, double start, double end, bool cosine) {
  if (iters <= 0 || step >= iters) return end;
  double frac = static_cast<double>(step) / iters;
  if (cosine) frac = 0.5 * (1.0 - std::cos(M_PI * frac));
  return start + (end - start) * frac;
}

}  // namespace eellm
