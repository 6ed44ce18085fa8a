#include "engine/tensor/param_store.h"

#include <algorithm>

#include "engine/core/status.h"

namespace eellm {

int ParamStore::Add(const std::string& name, const Shape& shape, bool weight_decay) {
  EE_CHECK(!allocated(), "ParamStore::Add after Allocate: ", name);
  EE_CHECK(!index_.contains(name), "duplicate parameter ", name);
  ParamInfo p;
  p.name = name;
  p.shape = shape;
  p.numel = static_cast<size_t>(NumElements(shape));
  // Keep every tensor 16-element (64-byte) aligned inside the arena.
  p.offset = (total_ + 15) / 16 * 16;
  p.weight_decay = weight_decay;
  total_ = p.offset + p.numel;
  params_.push_back(p);
  index_[name] = static_cast<int>(params_.size()) - 1;
  return static_cast<int>(params_.size()) - 1;
}

void ParamStore::Allocate(Backend* backend, bool gradients) {
  EE_CHECK(!allocated(), "ParamStore allocated twice");
  backend_ = backend;
  params_buf_ = Buffer(backend, padded_size() * sizeof(float));
  backend->Fill(params_buf_.f32(), padded_size(), 0.0f);
  grad_lo_ = gradients ? 0 : padded_size();
  if (gradients) {
    grads_buf_ = Buffer(backend, padded_size() * sizeof(float));
    backend->Fill(grads_buf_.f32(), padded_size(), 0.0f);
  }
  backend->RegisterWeights(params_buf_.f32(), padded_size());
}

ParamStore::~ParamStore() {
  if (backend_ != nullptr && params_buf_.f32() != nullptr) {
    backend_->UnregisterWeights(params_buf_.f32());
  }
}

int ParamStore::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

void ParamStore::ZeroGrads() { backend_->Fill(grads_buf_.f32(), grad_size(), 0.0f); }

float* ParamStore::grad_at(size_t offset) const {
  EE_CHECK(offset >= grad_lo_, "arena offset ", offset, " has no gradient (kept from ", grad_lo_,
           ")");
  return grads_buf_.f32() + (offset - grad_lo_);
}

size_t ParamStore::TrainableFrom() const {
  size_t first = padded_size();
  for (const ParamInfo& p : params_) {
    if (p.trainable) first = std::min(first, p.offset);
  }
  const size_t lo = first / kArenaMultiple * kArenaMultiple;
  return std::min(lo, padded_size() - kArenaMultiple);
}

void ParamStore::KeepGradientsFrom(size_t lo) {
  EE_CHECK(allocated(), "KeepGradientsFrom before Allocate");
  EE_CHECK(lo % kArenaMultiple == 0 && lo < padded_size(), "gradients cannot start at ", lo,
           " of an arena of ", padded_size());
  for (const ParamInfo& p : params_) {
    EE_CHECK(!p.trainable || p.offset >= lo, "trainable tensor ", p.name, " at ", p.offset,
             " lies below ", lo);
  }
  grad_lo_ = lo;
  grads_buf_ = Buffer();
  grads_buf_ = Buffer(backend_, grad_size() * sizeof(float));
  backend_->Fill(grads_buf_.f32(), grad_size(), 0.0f);
}

}  // namespace eellm
