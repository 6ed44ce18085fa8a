#include "models/tune_input_cache.h"

#include <utility>

#include "engine/core/status.h"

namespace eellm {

TuneInputCache::TuneInputCache(int64_t capacity, std::vector<size_t> floats_per_window)
    : capacity_(capacity), floats_(std::move(floats_per_window)), rows_(floats_.size()) {
  EE_CHECK(capacity_ >= 0, "tune cache capacity ", capacity_);
}

bool TuneInputCache::Admit(int64_t window) {
  if (size() >= capacity_ || Holds(window)) return false;
  const int64_t slot = size();
  slot_.emplace(window, slot);
  for (size_t c = 0; c < floats_.size(); ++c) {
    // Uninitialised: the forward's rows are stored before any are read.
    rows_[c].emplace_back(floats_[c] > 0 ? new float[floats_[c]] : nullptr);
  }
  return true;
}

float* TuneInputCache::Rows(int chunk, int64_t window) {
  auto it = slot_.find(window);
  EE_CHECK(it != slot_.end(), "window ", window, " is not in the tune cache");
  EE_CHECK(chunk >= 0 && chunk < static_cast<int>(rows_.size()), "chunk ", chunk);
  return rows_[chunk][it->second].get();
}

size_t TuneInputCache::BytesPerWindow() const {
  size_t floats = 0;
  for (size_t f : floats_) floats += f;
  return floats * sizeof(float);
}

}  // namespace eellm
