// StaleRanges: which elements of an array a derived copy (a bf16 weight copy) no longer matches,
// as sorted, disjoint [begin, end) ranges. Ranges less than `gap` elements apart merge, so that
// a refresh converts a few ranges (one launch each) however many writes made them stale: the
// optimizer's runs over the whole arena merge into one range, and a frozen backbone's exits
// (EE-Tuning) stay a few small ranges instead of the whole arena. Host code only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace eellm::cuda {

class StaleRanges {
 public:
  struct Range {
    size_t begin = 0, end = 0;
    bool operator==(const Range& o) const { return begin == o.begin && end == o.end; }
  };

  // An array of n elements, all of it stale.
  StaleRanges(size_t n, size_t gap) : n_(n), gap_(gap) { MarkAll(); }

  void MarkAll() {
    ranges_.clear();
    if (n_ > 0) ranges_.push_back({0, n_});
  }
  // Marks [begin, end) (clipped to the array) stale.
  void Mark(size_t begin, size_t end) {
    end = std::min(end, n_);
    if (begin >= end) return;
    std::vector<Range> kept;
    kept.reserve(ranges_.size() + 1);
    for (const Range& r : ranges_) {
      if (r.end + gap_ < begin || end + gap_ < r.begin) {
        kept.push_back(r);  // apart
      } else {
        begin = std::min(begin, r.begin);  // within the gap: merged
        end = std::max(end, r.end);
      }
    }
    const Range merged{begin, end};
    kept.insert(std::lower_bound(kept.begin(), kept.end(), merged,
                                 [](const Range& a, const Range& b) { return a.begin < b.begin; }),
                merged);
    ranges_ = std::move(kept);
  }
  void Clear() { ranges_.clear(); }
  bool empty() const { return ranges_.empty(); }
  const std::vector<Range>& ranges() const { return ranges_; }

 private:
  size_t n_, gap_;
  std::vector<Range> ranges_;
};

}  // namespace eellm::cuda
