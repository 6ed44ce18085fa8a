// Scalar schedules: learning rate (linear warm-up then cosine decay to a minimum) and warm-up
// ramps (linear or cosine) used for early-exit loss weights.
#pragma once

namespace eellm {

// LR at optimizer step `step` (0-based): linear warm-up from 0 over `warmup` steps to `max_lr`,
// then cosine decay to `min_lr` at `total` steps; constant `min_lr` afterwards.
double WarmupCosineLr(int step, int warmup, int total, double max_lr, double min_lr);

// Ramp from `start` to `end` over `iters` steps (linear or cosine); `end` from step `iters` on.
double Ramp(int step, int iters, double start, double end, bool cosine);

}  // namespace eellm
