// DistributedOptimizer: AdamW across the data-parallel group. Gradients are averaged over dp
// (all-reduce of the contiguous gradient arena in buckets, non-blocking, so that buckets
// overlap one another on the wire and, when the backward reports finished layers through
// GradientsReady, with the rest of the backward), clipped by the global norm and applied. With
// ZeRO-1 the optimizer state is sharded: gradients are reduce-scattered, each rank updates its 1/dp
// of the arena with its shard of the moments, and the updated parameters are all-gathered. All of
// it covers the gradient arena, [ParamStore::grad_lo(), padded_size()): the whole arena, or the
// trainable tail of a frozen model.
#pragma once

#include <memory>
#include <vector>

#include "engine/optim/adamw.h"
#include "engine/tensor/param_store.h"
#include "parallel/parallel_context.h"

namespace eellm {

class DistributedOptimizer {
 public:
  // `bucket_elems`: all-reduce granularity (elements) when not sharded.
  DistributedOptimizer(ParamStore* params, const AdamWConfig& config, ParallelContext* ctx,
                       bool zero1, size_t bucket_elems = size_t{1} << 20);

  // Averages gradients over dp, clips, updates; returns the global gradient norm (before
  // clipping), identical on every rank.
  double Step(float lr);

  // Step in two halves, for several optimizers whose parameters together form the model (the
  // model chunks of interleaved pipeline parallelism): ReduceGradients averages the gradients
  // over dp (reduce-scatter under ZeRO-1; without it, buckets of frozen tensors only are left
  // alone) and returns the squared norm of the part this rank
  // owns; GlobalSquaredNorm sums such a local value over the ZeRO-1 shards and pipeline stages
  // (collective; identical on every rank); Apply clips by `global_norm` and updates.
  // Step(lr) == Apply(lr, sqrt(GlobalSquaredNorm(ReduceGradients()))).
  double ReduceGradients();

  // During the last backward pass of a step: the gradients in arena range [lo, hi) are final.
  // Buckets that lie wholly inside the final ranges reported so far start their all-reduce at
  // once (not under ZeRO-1, whose reduce-scatter covers the whole gradient arena, nor with
  // dp 1);
  // ReduceGradients starts the rest and waits for all. The result is the same either way.
  void GradientsReady(size_t lo, size_t hi);
  // Buckets started early by GradientsReady in the last step (for tests and reports).
  int early_buckets() const { return early_buckets_; }
  double GlobalSquaredNorm(double local_sq);
  void Apply(float lr, double global_norm);

  AdamW& adamw() { return *adamw_; }
  bool zero1() const { return zero1_; }

 private:
  void AllReduceGradients();
  void StartBucket(size_t k);

  ParamStore* params_;
  ParallelContext* ctx_;
  bool zero1_;
  size_t bucket_elems_;
  size_t shard_ = 0;  // ZeRO-1 shard size (elements)
  Buffer scratch_;    // ZeRO-1: reduce-scatter / all-gather staging, one shard
  Buffer norm_;       // one float for the squared-norm all-reduce
  std::unique_ptr<AdamW> adamw_;
  // Overlap state of the current step: per bucket, its request once started; the arena range
  // [ready_lo_, ready_hi_) known to hold final gradients (layers report from the top down).
  std::vector<std::unique_ptr<Request>> pending_;
  std::vector<bool> started_;
  size_t ready_lo_ = 0, ready_hi_ = 0;
  int early_buckets_ = 0, early_this_step_ = 0;
};

}  // namespace eellm
