// TuneInputCache: EE-Tuning's store of what a frozen backbone hands its exits. The backbone's
// hidden states of a training window never change while only the exits train, so from a
// window's second epoch on they can be read back instead of recomputed (EE-LLM recomputes them
// every step). The cache admits windows (indices into the training data) in the order they come,
// while it has room, and keeps, per model chunk of this rank, the rows the chunk's tuning step
// reads (Model::TuneInputs) in host memory: [window slot][floats_per_window[chunk]] fp32.
// Admission depends on the window sequence and the capacity alone, so every rank given the same
// windows and capacity holds the same windows (the pipeline stages and tensor-parallel ranks of
// a data-parallel rank agree on which steps run from the cache without exchanging a message).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace eellm {

class TuneInputCache {
 public:
  // Room for `capacity` windows; `floats_per_window[c]`: the floats chunk c keeps per window.
  TuneInputCache(int64_t capacity, std::vector<size_t> floats_per_window);

  int64_t capacity() const { return capacity_; }
  int64_t size() const { return static_cast<int64_t>(slot_.size()); }
  bool Holds(int64_t window) const { return slot_.count(window) != 0; }
  // Admits `window` when it is not held and there is room; true when newly admitted (its rows
  // must then be written through Rows before they are read).
  bool Admit(int64_t window);
  // The rows of chunk `chunk` for a held window: floats_per_window[chunk] floats.
  float* Rows(int chunk, int64_t window);
  // Host bytes this rank keeps per window, over its chunks.
  size_t BytesPerWindow() const;

 private:
  int64_t capacity_;
  std::vector<size_t> floats_;
  std::unordered_map<int64_t, int64_t> slot_;                // window -> slot
  std::vector<std::vector<std::unique_ptr<float[]>>> rows_;  // [chunk][slot]
};

}  // namespace eellm
