#include "engine/optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "engine/core/status.h"

namespace eellm {

AdamW::AdamW(ParamStore* params, const AdamWConfig& config, size_t lo, size_t hi)
    : params_(params), config_(config), lo_(lo), hi_(std::min(hi, params->padded_size())) {
  EE_CHECK(params->allocated(), "AdamW needs an allocated ParamStore");
  EE_CHECK(lo_ <= hi_, "bad optimizer shard [", lo, ", ", hi, ")");
  Backend* be = params->backend();
  const size_t n = hi_ - lo_;
  m_ = Buffer(be, n * sizeof(float));
  v_ = Buffer(be, n * sizeof(float));
  be->Fill(m_.f32(), n, 0.0f);
  be->Fill(v_.f32(), n, 0.0f);
}

template <typename Fn>
void AdamW::ForEachOwned(Fn fn) const {
  for (int i = 0; i < static_cast<int>(params_->params().size()); ++i) {
    const ParamInfo& p = params_->params()[i];
    if (!p.trainable) continue;
    const size_t a = std::max(lo_, p.offset), b = std::min(hi_, p.offset + p.numel);
    if (a < b) fn(i, a, b - a);
  }
}

double AdamW::LocalSquaredNorm() const {
  double sum = 0;
  ForEachOwned([&](int i, size_t first, size_t count) {
    if (!params_->params()[i].count_in_norm) return;
    sum += params_->backend()->SumSquares(params_->grads_data() + first, count);
  });
  return sum;
}

float AdamW::ClipScale(double global_norm) const {
  if (config_.grad_clip > 0 && global_norm > config_.grad_clip) {
    return static_cast<float>(config_.grad_clip / global_norm);
  }
  return 1.0f;
}

void AdamW::Update(float lr, float grad_scale) {
  Backend* be = params_->backend();
  ++step_;
  ForEachOwned([&](int i, size_t first, size_t count) {
    float* g = params_->grads_data() + first;
    if (grad_scale != 1.0f) be->Scale(g, grad_scale, count);
    be->AdamW(params_->params_data() + first, g, m_.f32() + (first - lo_), v_.f32() + (first - lo_),
              count, lr, config_.beta1, config_.beta2, config_.eps,
              params_->params()[i].weight_decay ? config_.weight_decay : 0.0f, step_);
  });
}

double AdamW::Step(float lr) {
  const double norm = std::sqrt(LocalSquaredNorm());
  Update(lr, ClipScale(norm));
  return norm;
}

}  // namespace eellm
