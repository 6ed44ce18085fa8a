#include "engine/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/core/status.h"

namespace eellm {

AdamW::AdamW(ParamStore* params, const AdamWConfig& config, size_t lo, size_t hi)
    : params_(params),
      config_(config),
      lo_(std::max(lo, params->grad_lo())),
      hi_(std::min(hi, params->padded_size())) {
  EE_CHECK(params->allocated(), "AdamW needs an allocated ParamStore");
  EE_CHECK(lo_ <= hi_, "bad optimizer shard [", lo_, ", ", hi_, ")");
  Backend* be = params->backend();
  const size_t n = hi_ - lo_;
  m_ = Buffer(be, n * sizeof(float));
  v_ = Buffer(be, n * sizeof(float));
  be->Fill(m_.f32(), n, 0.0f);
  be->Fill(v_.f32(), n, 0.0f);
}

template <typename Key, typename Fn>
void AdamW::ForEachRun(Key key, Fn fn) const {
  size_t run_lo = 0, run_hi = 0;  // current run [run_lo, run_hi), empty when equal
  bool run_key = false;
  for (const ParamInfo& p : params_->params()) {
    const size_t a = std::max(lo_, p.offset), b = std::min(hi_, p.offset + p.numel);
    const bool k = key(p);
    if (!p.trainable || a >= b || (run_hi > run_lo && k != run_key)) {
      if (run_hi > run_lo) fn(run_lo, run_hi - run_lo, run_key);
      run_lo = run_hi = 0;
      if (!p.trainable || a >= b) continue;
    }
    if (run_hi == run_lo) {
      run_lo = a;
      run_key = k;
    }
    run_hi = b;
  }
  if (run_hi > run_lo) fn(run_lo, run_hi - run_lo, run_key);
}

double AdamW::LocalSquaredNorm() const {
  std::vector<Backend::Range> counted;  // offsets in the gradient arena (from grad_lo())
  ForEachRun([](const ParamInfo& p) { return p.count_in_norm; },
             [&](size_t first, size_t count, bool in_norm) {
               if (in_norm) counted.push_back({first - params_->grad_lo(), count});
             });
  return params_->backend()->SumSquaresRanges(params_->grads_data(), counted);
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
  if (grad_scale != 1.0f) {
    ForEachRun([](const ParamInfo&) { return true; },
               [&](size_t first, size_t count, bool) {
                 be->Scale(params_->grad_at(first), grad_scale, count);
               });
  }
  // Every run in one call (one launch on a GPU), offsets from lo_.
  std::vector<Backend::AdamWRun> runs;
  ForEachRun([](const ParamInfo& p) { return p.weight_decay; },
             [&](size_t first, size_t count, bool decay) {
               runs.push_back({first - lo_, count, decay});
             });
  if (runs.empty()) return;
  be->AdamWRuns(params_->params_data() + lo_, params_->grad_at(lo_), m_.f32(), v_.f32(), runs, lr,
                config_.beta1, config_.beta2, config_.eps, config_.weight_decay, step_);
}

double AdamW::Step(float lr) {
  const double norm = std::sqrt(LocalSquaredNorm());
  Update(lr, ClipScale(norm));
  return norm;
}

}  // namespace eellm
