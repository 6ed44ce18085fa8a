#include "engine/optim/schedules.h"

#include <algorithm>
#include <cmath>

namespace eellm {

double WarmupCosineLr(int step, int warmup, int total, double max_lr, double min_lr) {
  if (warmup > 0 && step < warmup) return max_lr * (step + 1) / warmup;
  if (step >= total) return min_lr;
  int decay_steps = std::max(1, total - warmup);
  double progress = static_cast<double>(step - warmup) / decay_steps;
  return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

double Ramp(int step, int iters, double start, double end, bool cosine) {
  if (iters <= 0 || step >= iters) return end;
  double frac = static_cast<double>(step) / iters;
  if (cosine) frac = 0.5 * (1.0 - std::cos(M_PI * frac));
  return start + (end - start) * frac;
}

}  // namespace eellm
