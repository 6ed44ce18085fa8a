#include "parallel/distributed_optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/core/status.h"

namespace eellm {

DistributedOptimizer::DistributedOptimizer(ParamStore* params, const AdamWConfig& config,
                                           ParallelContext* ctx, bool zero1, size_t bucket_elems)
    : params_(params), ctx_(ctx), zero1_(zero1 && ctx->grid.dp() > 1), bucket_elems_(bucket_elems) {
  const int dp = ctx->grid.dp();
  if (zero1_) {
    EE_CHECK(params->grad_size() % dp == 0, "gradient arena of ", params->grad_size(),
             " elements does not split into ", dp, " shards");
    shard_ = params->grad_size() / dp;
    const size_t lo = params->grad_lo() + shard_ * ctx->coord.dp;
    scratch_ = Buffer(params->backend(), shard_ * sizeof(float));
    adamw_ = std::make_unique<AdamW>(params, config, lo, lo + shard_);
  } else {
    adamw_ = std::make_unique<AdamW>(params, config);
  }
  norm_ = Buffer(params->backend(), sizeof(float));
}

// Buckets split the gradient arena: bucket k holds arena offsets grad_lo() + k * bucket_elems_
// onwards.
void DistributedOptimizer::StartBucket(size_t k) {
  const size_t n = params_->grad_size();
  const size_t first = k * bucket_elems_;
  pending_[k] = ctx_->dp->IAllReduce(params_->grads_data() + first,
                                     std::min(bucket_elems_, n - first), ReduceOp::kSum);
  started_[k] = true;
}

void DistributedOptimizer::GradientsReady(size_t lo, size_t hi) {
  if (zero1_ || ctx_->grid.dp() <= 1 || hi <= lo) return;
  // In gradient-arena coordinates (what lies below it has no gradient).
  const size_t base = params_->grad_lo();
  if (hi <= base) return;
  lo = std::max(lo, base) - base;
  hi -= base;
  const size_t n = params_->grad_size();
  const size_t buckets = (n + bucket_elems_ - 1) / bucket_elems_;
  if (started_.size() != buckets) {
    started_.assign(buckets, false);
    pending_.resize(buckets);
  }
  // Extend the final range downwards (layers report from the top down; tensors are 16-element
  // aligned, so neighbouring layers may be up to 15 padding elements apart).
  if (ready_hi_ == ready_lo_ || hi > ready_lo_ || ready_lo_ - hi >= 16) {
    ready_lo_ = lo;
    ready_hi_ = hi;
  } else {
    ready_lo_ = lo;
  }
  for (size_t k = ready_lo_ / bucket_elems_; k < buckets; ++k) {
    const size_t first = k * bucket_elems_, last = std::min(n, first + bucket_elems_);
    if (last > ready_hi_) break;
    if (first >= ready_lo_ && !started_[k]) {
      StartBucket(k);
      ++early_this_step_;
    }
  }
}

void DistributedOptimizer::AllReduceGradients() {
  const size_t n = params_->grad_size(), base = params_->grad_lo();
  const size_t buckets = (n + bucket_elems_ - 1) / bucket_elems_;
  if (started_.size() != buckets) {
    started_.assign(buckets, false);
    pending_.resize(buckets);
  }
  // Buckets holding only frozen tensors (EE-Tuning's backbone) are not reduced: the optimizer
  // and the norm never read their gradients.
  std::vector<bool> trainable(buckets, false);
  for (const ParamInfo& p : params_->params()) {
    if (!p.trainable || p.numel == 0) continue;
    const size_t at = p.offset - base;  // trainable tensors lie in the gradient arena
    for (size_t k = at / bucket_elems_; k <= (at + p.numel - 1) / bucket_elems_; ++k) {
      trainable[k] = true;
    }
  }
  for (size_t k = 0; k < buckets; ++k) {
    if (!started_[k] && trainable[k]) StartBucket(k);
  }
  for (auto& r : pending_) {
    if (r) r->Wait();
    r.reset();
  }
  std::fill(started_.begin(), started_.end(), false);
  ready_lo_ = ready_hi_ = 0;
  early_buckets_ = early_this_step_;
  early_this_step_ = 0;
}

double DistributedOptimizer::Step(float lr) {
  const double norm = std::sqrt(GlobalSquaredNorm(ReduceGradients()));
  Apply(lr, norm);
  return norm;
}

double DistributedOptimizer::ReduceGradients() {
  Backend* be = params_->backend();
  const int dp = ctx_->grid.dp();
  const float inv_dp = 1.0f / dp;
  if (zero1_) {
    // This rank's shard of the summed gradients.
    ctx_->dp->ReduceScatter(params_->grads_data(), scratch_.f32(), shard_, ReduceOp::kSum);
    float* own = params_->grad_at(adamw_->lo());
    be->Copy(own, scratch_.f32(), shard_ * sizeof(float));
    be->Scale(own, inv_dp, shard_);
  } else if (dp > 1) {
    AllReduceGradients();
    be->Scale(params_->grads_data(), inv_dp, params_->grad_size());
  }
  return adamw_->LocalSquaredNorm();
}

double DistributedOptimizer::GlobalSquaredNorm(double sq) {
  // Global norm: shards (ZeRO-1), pipeline stages and tensor-parallel shards hold disjoint parts
  // of the gradient (replicated tensors count on tensor-parallel rank 0 only: count_in_norm).
  // The squared norms are summed in fp32 on the wire (one device float); every rank gets the
  // same sum and so the same clipping factor.
  if (zero1_ || ctx_->grid.pp() > 1 || ctx_->grid.tp() > 1) {
    Backend* be = params_->backend();
    float sq_f = static_cast<float>(sq);
    be->CopyFromHost(norm_.f32(), &sq_f, sizeof(float));
    if (zero1_) ctx_->dp->AllReduce(norm_.f32(), 1, ReduceOp::kSum);
    if (ctx_->grid.pp() > 1) ctx_->pp->AllReduce(norm_.f32(), 1, ReduceOp::kSum);
    if (ctx_->grid.tp() > 1) ctx_->tp->AllReduce(norm_.f32(), 1, ReduceOp::kSum);
    be->CopyToHost(&sq_f, norm_.f32(), sizeof(float));
    sq = sq_f;
  }
  return sq;
}

void DistributedOptimizer::Apply(float lr, double global_norm) {
  adamw_->Update(lr, adamw_->ClipScale(global_norm));
  if (zero1_) {
    Backend* be = params_->backend();
    be->Copy(scratch_.f32(), params_->params_data() + adamw_->lo(), shard_ * sizeof(float));
    ctx_->dp->AllGather(scratch_.f32(), params_->params_data() + params_->grad_lo(), shard_);
    // The communicator wrote past the backend: the arena's part with gradients (EE-Tuning's
    // trainable tail; all of it in full training).
    be->WeightsChanged(params_->params_data() + params_->grad_lo(), params_->grad_size());
  }
}

}  // namespace eellm
