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
    EE_CHECK(params->padded_size() % dp == 0, "arena of ", params->padded_size(),
             " elements does not split into ", dp, " shards");
    shard_ = params->padded_size() / dp;
    const size_t lo = shard_ * ctx->coord.dp;
    scratch_ = Buffer(params->backend(), shard_ * sizeof(float));
    adamw_ = std::make_unique<AdamW>(params, config, lo, lo + shard_);
  } else {
    adamw_ = std::make_unique<AdamW>(params, config);
  }
  norm_ = Buffer(params->backend(), sizeof(float));
}

void DistributedOptimizer::AllReduceGradients() {
  const size_t n = params_->padded_size();
  std::vector<std::unique_ptr<Request>> pending;
  for (size_t first = 0; first < n; first += bucket_elems_) {
    pending.push_back(ctx_->dp->IAllReduce(params_->grads_data() + first,
                                           std::min(bucket_elems_, n - first), ReduceOp::kSum));
  }
  for (auto& r : pending) r->Wait();
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
    float* own = params_->grads_data() + adamw_->lo();
    be->Copy(own, scratch_.f32(), shard_ * sizeof(float));
    be->Scale(own, inv_dp, shard_);
  } else if (dp > 1) {
    AllReduceGradients();
    be->Scale(params_->grads_data(), inv_dp, params_->padded_size());
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
    ctx_->dp->AllGather(scratch_.f32(), params_->params_data(), shard_);
  }
}

}  // namespace eellm
