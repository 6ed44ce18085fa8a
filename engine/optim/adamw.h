// AdamW over a ParamStore: fp32 first/second moments in arenas with the parameters' layout,
// decoupled weight decay (skipped for biases and norm gains), global-norm gradient clipping.
#pragma once

#include "engine/tensor/param_store.h"

namespace eellm {

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;  // max global L2 norm; <= 0 disables clipping
};

class AdamW {
 public:
  AdamW(ParamStore* params, const AdamWConfig& config);

  // Global L2 norm of the trainable gradients.
  double GradNorm() const;
  // Clips (when configured) and applies one update with learning rate `lr`. Returns the
  // gradient norm before clipping.
  double Step(float lr);

  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  float* m() const { return m_.f32(); }
  float* v() const { return v_.f32(); }

 private:
  ParamStore* params_;
  AdamWConfig config_;
  Buffer m_, v_;
  int step_ = 0;
};

}  // namespace eellm
