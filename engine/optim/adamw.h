// AdamW over a ParamStore: fp32 first/second moments, decoupled weight decay (skipped for
// biases and norm gains), global-norm gradient clipping. The optimizer may own only a shard
// [lo, hi) of the parameter arena (ZeRO-1): its moments then cover just that range, and the
// caller combines the shards' squared gradient norms and gathers the updated parameters.
#pragma once

#include <cstddef>

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
  // Owns the arena range [lo, hi) (elements), at most the gradient arena's (a `lo` below
  // ParamStore::grad_lo() is raised to it); the default is the whole gradient arena.
  AdamW(ParamStore* params, const AdamWConfig& config, size_t lo = 0, size_t hi = SIZE_MAX);

  // Sum of squared trainable gradients inside the owned range.
  double LocalSquaredNorm() const;
  // Applies one update to the owned range with gradients multiplied by `grad_scale`.
  void Update(float lr, float grad_scale);
  // Clipping factor for a global gradient norm (1 when no clipping is needed).
  float ClipScale(double global_norm) const;

  // Single process: norm, clip, update. Returns the gradient norm before clipping.
  double Step(float lr);

  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  size_t lo() const { return lo_; }
  size_t hi() const { return hi_; }
  // Moments of the owned range: element i belongs to arena offset lo() + i.
  float* m() const { return m_.f32(); }
  float* v() const { return v_.f32(); }

 private:
  // Calls fn(first element, count, key) for each maximal run of consecutive trainable tensors
  // inside [lo, hi) with equal key(ParamInfo). A run includes the alignment padding between
  // its tensors (zeros in every arena, left zero by every op), so one backend call covers many
  // tensors: fewer kernel launches and, for norms, fewer device-to-host synchronisations.
  template <typename Key, typename Fn>
  void ForEachRun(Key key, Fn fn) const;

  ParamStore* params_;
  AdamWConfig config_;
  size_t lo_, hi_;
  Buffer m_, v_;
  int step_ = 0;
};

}  // namespace eellm
