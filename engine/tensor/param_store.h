// ParamStore: named parameter tensors packed into one contiguous arena, with a gradient arena
// of the same layout (llm.c). Names are global ("layers.3.attn.wq.weight"); with tensor
// parallelism shapes are this rank's block (ParamInfo::split_dim). Contiguous gradients make
// clipping, bucketed all-reduce and sharded optimizers offset arithmetic. When only the tensors
// from some offset on train (EE-Tuning's exits, declared last), the gradient arena (and the
// optimizer's moments, which follow it) covers just that tail: KeepGradientsFrom.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace eellm {

struct ParamInfo {
  std::string name;
  Shape shape;
  size_t offset = 0;  // in elements, into the arenas
  size_t numel = 0;
  bool weight_decay = true;  // false for biases and norm gains
  bool trainable = true;     // false for frozen parameters (EE-Tuning backbones)
  // false for a replica whose gradient norm another rank already counts (tied embeddings held
  // by several pipeline stages), so the global norm counts each parameter once.
  bool count_in_norm = true;
  // Tensor parallelism: the dimension split over the tp ranks (0 = rows, 1 = columns), -1 when
  // every rank holds the whole tensor. `shape` is this rank's part.
  int split_dim = -1;
  // Tensor-parallel ranks holding the same block (KV projections when tp > KV heads): rank r
  // holds block r / tp_replicas of tp / tp_replicas along split_dim.
  int tp_replicas = 1;
  // Held whole by every tensor-parallel rank, whose gradient covers only the rank's heads (the
  // q and k norms' gains): the ranks sum theirs.
  bool sum_grad_over_tp = false;
};

class ParamStore {
 public:
  // Declare all parameters first, then Allocate() once.
  // Returns the index of the new parameter.
  int Add(const std::string& name, const Shape& shape, bool weight_decay);
  // Params zero-filled; grads zero-filled, or with `gradients` false none until
  // KeepGradientsFrom.
  void Allocate(Backend* backend, bool gradients = true);
  ParamStore() = default;
  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;
  ~ParamStore();  // unregisters the parameter arena from the backend

  // Arenas are padded to a multiple of kArenaMultiple elements (zeros past size()): the
  // data-parallel optimizer splits them into equal 64-byte-aligned shards for any dp <= 8.
  static constexpr size_t kArenaMultiple = 16 * 840;  // 840 = lcm(1..8)
  size_t padded_size() const {
    return (total_ + kArenaMultiple - 1) / kArenaMultiple * kArenaMultiple;
  }
  bool allocated() const { return backend_ != nullptr; }
  Backend* backend() const { return backend_; }
  size_t size() const { return total_; }  // elements
  const std::vector<ParamInfo>& params() const { return params_; }
  std::vector<ParamInfo>& mutable_params() { return params_; }
  int Find(const std::string& name) const;  // -1 when absent

  float* param(int i) const { return params_buf_.f32() + params_[i].offset; }
  // Tensor i's gradient, or null for a tensor below grad_lo() (it has none).
  float* grad(int i) const {
    return params_[i].offset < grad_lo_ ? nullptr
                                        : grads_buf_.f32() + (params_[i].offset - grad_lo_);
  }
  float* params_data() const { return params_buf_.f32(); }
  // The gradient of arena offset `offset` (>= grad_lo()).
  float* grad_at(size_t offset) const;
  // The gradient arena: arena offsets [grad_lo(), padded_size()), grads_data() holding grad_lo().
  float* grads_data() const { return grads_buf_.f32(); }
  size_t grad_lo() const { return grad_lo_; }
  size_t grad_size() const { return padded_size() - grad_lo_; }
  // Frozen training: keeps gradients only for arena offsets [lo, padded_size()) (lo a multiple of
  // kArenaMultiple, no trainable tensor below it), freeing any others; zero-filled. Call before
  // making optimizers, whose moments cover the same range.
  void KeepGradientsFrom(size_t lo);
  // The offset KeepGradientsFrom would take: the first trainable tensor's, rounded down to a
  // multiple of kArenaMultiple, and at most padded_size() - kArenaMultiple (never empty).
  size_t TrainableFrom() const;
  void ZeroGrads();

 private:
  Backend* backend_ = nullptr;
  std::vector<ParamInfo> params_;
  absl::flat_hash_map<std::string, int> index_;
  size_t total_ = 0;
  size_t grad_lo_ = 0;
  Buffer params_buf_;
  Buffer grads_buf_;
};

}  // namespace eellm
