#include "engine/tensor/param_store.h"

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

void ParamStore::Allocate(Backend* backend) {
  EE_CHECK(!allocated(), "ParamStore allocated twice");
  backend_ = backend;
  params_buf_ = Buffer(backend, padded_size() * sizeof(float));
  grads_buf_ = Buffer(backend, padded_size() * sizeof(float));
  backend->Fill(params_buf_.f32(), padded_size(), 0.0f);
  backend->Fill(grads_buf_.f32(), padded_size(), 0.0f);
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

void ParamStore::ZeroGrads() { backend_->Fill(grads_buf_.f32(), padded_size(), 0.0f); }

}  // namespace eellm
