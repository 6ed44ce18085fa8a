#include "models/loss_log.h"

#include <algorithm>
#include <utility>

#include "engine/core/status.h"

namespace eellm {

HeadLossSums SumHeadLoss(const float* losses, const float* mask, double count, const float* weights,
                         const float* confidences, int n) {
  HeadLossSums s;
  for (int r = 0; r < n; ++r) {
    s.mean += mask[r] * losses[r];
    if (weights != nullptr) {
      const float w = confidences != nullptr ? weights[r] * confidences[r] : weights[r];
      s.term += w * losses[r];
    }
  }
  s.mean /= count;
  return s;
}

void LossLog::Reserve(size_t rows) {
  if (rows * sizeof(float) <= log_.bytes()) return;
  EE_CHECK(used_ == 0, "LossLog::Reserve with ", used_, " rows queued");
  log_ = Buffer(be_, rows * sizeof(float));
}

void LossLog::Add(int exit_index, const float* losses, int n, const float* mask, double count,
                  const float* weights, const float* confidences) {
  const size_t rows = static_cast<size_t>(n) * (confidences != nullptr ? 2 : 1);
  const size_t need = (used_ + rows) * sizeof(float);
  if (need > log_.bytes()) {
    Buffer grown(be_, std::max(need, 2 * log_.bytes()));
    if (used_ > 0) be_->Copy(grown.data(), log_.data(), used_ * sizeof(float));
    log_ = std::move(grown);
  }
  be_->Copy(log_.f32() + used_, losses, static_cast<size_t>(n) * sizeof(float));
  if (confidences != nullptr) {
    be_->Copy(log_.f32() + used_ + n, confidences, static_cast<size_t>(n) * sizeof(float));
  }
  passes_.push_back(
      {exit_index, used_, n, confidences != nullptr, count, std::vector<float>(mask, mask + n),
       weights != nullptr ? std::vector<float>(weights, weights + n) : std::vector<float>()});
  used_ += rows;
}

void LossLog::EndReport() {
  if (!passes_.empty()) passes_.back().ends_report = true;
}

void LossLog::TakeInto(LossReport* total, int microbatches) {
  if (passes_.empty()) return;
  host_.resize(used_);
  be_->CopyToHost(host_.data(), log_.data(), used_ * sizeof(float));
  double objective = 0;  // of the report being summed
  for (const Pass& p : passes_) {
    const HeadLossSums s =
        SumHeadLoss(host_.data() + p.offset, p.mask.data(), p.count,
                    p.weights.empty() ? nullptr : p.weights.data(),
                    p.confidences ? host_.data() + p.offset + p.n : nullptr, p.n);
    if (p.exit_index < 0) {
      total->final_loss += s.mean / microbatches;
    } else {
      EE_CHECK(static_cast<size_t>(p.exit_index) < total->exit_losses.size(), "exit ", p.exit_index,
               " has no loss in the report");
      total->exit_losses[p.exit_index] += s.mean / microbatches;
    }
    objective += s.term;
    if (p.ends_report || &p == &passes_.back()) {
      total->objective += objective;
      objective = 0;
    }
  }
  passes_.clear();
  used_ = 0;
}

}  // namespace eellm
