// CpuBackend softmax cross-entropy: per-row loss, max probability and weighted dlogits, with
// max-subtraction for stability. dlogits may alias logits: row statistics are computed before
// the row is overwritten. Logits are fp32, as every operand of this backend.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/core/cross_entropy_weight.h"
#include "engine/core/status.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/cpu_exp.h"

namespace eellm {

void CpuBackend::CrossEntropy(float* losses, float* max_prob, Operand dlogits_op,
                              ConstOperand logits_op, const int32_t* targets, const float* weights,
                              bool by_confidence, int n, int v) {
  float* dlogits = dlogits_op.f32();
  const float* logits = logits_op.f32();
  const bool parallel = static_cast<int64_t>(n) * v >= (int64_t{1} << 14);
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < n; ++r) {
    const float* lr = logits + static_cast<size_t>(r) * v;
    const int target = targets[r];
    EE_CHECK(target >= 0 && target < v, "CrossEntropy target ", target, " outside [0, ", v, ")");
    const float target_logit = lr[target];  // read before dlogits (maybe aliased) is written
    float mx = lr[0];
    for (int j = 1; j < v; ++j) mx = std::max(mx, lr[j]);
    float* dr = dlogits != nullptr ? dlogits + static_cast<size_t>(r) * v : nullptr;
    double sum = 0.0;
    if (dr != nullptr) {
      // Store exp(l - mx) in place (dr may alias lr: element by element).
      cpu::Exp(dr, lr, v, 1.0f, mx);
      for (int j = 0; j < v; ++j) sum += dr[j];
    } else {
      sum = cpu::SumExp(lr, v, mx);
    }
    // -log p[target] = log(sum exp(l - mx)) - (l[target] - mx).
    losses[r] = static_cast<float>(std::log(sum) - (static_cast<double>(target_logit) - mx));
    const float p = static_cast<float>(1.0 / sum);
    if (max_prob != nullptr) max_prob[r] = p;
    if (dr != nullptr) {
      const float w = CrossEntropyRowWeight(weights, r, by_confidence, p);
      const float scale = static_cast<float>(w / sum);
      for (int j = 0; j < v; ++j) dr[j] *= scale;
      dr[target] -= w;
    }
  }
}

void CpuBackend::RowMax(float* row_max, ConstOperand logits_op, int n, int v) {
  const float* logits = logits_op.f32();
  const bool parallel = static_cast<int64_t>(n) * v >= (int64_t{1} << 14);
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < n; ++r) {
    const float* lr = logits + static_cast<size_t>(r) * v;
    float mx = lr[0];
    for (int j = 1; j < v; ++j) mx = std::max(mx, lr[j]);
    row_max[r] = mx;
  }
}

void CpuBackend::SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits_op,
                                 const float* row_max, const int32_t* targets, int n, int v,
                                 int start) {
  const float* logits = logits_op.f32();
  const bool parallel = static_cast<int64_t>(n) * v >= (int64_t{1} << 14);
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < n; ++r) {
    const float* lr = logits + static_cast<size_t>(r) * v;
    sum_exp[r] = static_cast<float>(cpu::SumExp(lr, v, row_max[r]));
    const int64_t j = static_cast<int64_t>(targets[r]) - start;
    target_logit[r] = j >= 0 && j < v ? lr[j] : 0.0f;
  }
}

void CpuBackend::CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                       const float* sum_exp, const float* target_logit, int n) {
  for (int r = 0; r < n; ++r) {
    losses[r] = static_cast<float>(std::log(static_cast<double>(sum_exp[r])) + row_max[r] -
                                   target_logit[r]);
    if (max_prob != nullptr) max_prob[r] = 1.0f / sum_exp[r];
  }
}

void CpuBackend::CrossEntropyGradRange(Operand dlogits_op, ConstOperand logits_op,
                                       const float* row_max, const float* sum_exp,
                                       const int32_t* targets, const float* weights,
                                       bool by_confidence, int n, int v, int start) {
  float* dlogits = dlogits_op.f32();
  const float* logits = logits_op.f32();
  const bool parallel = static_cast<int64_t>(n) * v >= (int64_t{1} << 14);
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < n; ++r) {
    const float* lr = logits + static_cast<size_t>(r) * v;
    float* dr = dlogits + static_cast<size_t>(r) * v;
    const float w = CrossEntropyRowWeight(weights, r, by_confidence, 1.0f / sum_exp[r]);
    const float scale = w / sum_exp[r];
    cpu::Exp(dr, lr, v, 1.0f, row_max[r]);
    for (int j = 0; j < v; ++j) dr[j] *= scale;
    const int64_t j = static_cast<int64_t>(targets[r]) - start;
    if (j >= 0 && j < v) dr[j] -= w;
  }
}

}  // namespace eellm
