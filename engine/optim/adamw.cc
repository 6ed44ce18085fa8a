#include "engine/optim/adamw.h"

#include <cmath>

#include "engine/core/status.h"

namespace eellm {

AdamW::AdamW(ParamStore* params, const AdamWConfig& config) : params_(params), config_(config) {
  EE_CHECK(params->allocated(), "AdamW needs an allocated ParamStore");
  Backend* be = params->backend();
  m_ = Buffer(be, params->size() * sizeof(float));
  v_ = Buffer(be, params->size() * sizeof(float));
  be->Fill(m_.f32(), params->size(), 0.0f);
  be->Fill(v_.f32(), params->size(), 0.0f);
}

double AdamW::GradNorm() const {
  double sum = 0;
  for (int i = 0; i < static_cast<int>(params_->params().size()); ++i) {
    const ParamInfo& p = params_->params()[i];
    if (p.trainable) sum += params_->backend()->SumSquares(params_->grad(i), p.numel);
  }
  return std::sqrt(sum);
}

double AdamW::Step(float lr) {
  Backend* be = params_->backend();
  double norm = GradNorm();
  float scale = 1.0f;
  if (config_.grad_clip > 0 && norm > config_.grad_clip) scale = config_.grad_clip / norm;
  ++step_;
  for (int i = 0; i < static_cast<int>(params_->params().size()); ++i) {
    const ParamInfo& p = params_->params()[i];
    if (!p.trainable) continue;
    if (scale != 1.0f) be->Scale(params_->grad(i), scale, p.numel);
    be->AdamW(params_->param(i), params_->grad(i), m_.f32() + p.offset, v_.f32() + p.offset,
              p.numel, lr, config_.beta1, config_.beta2, config_.eps,
              p.weight_decay ? config_.weight_decay : 0.0f, step_);
  }
  return norm;
}

}  // namespace eellm
