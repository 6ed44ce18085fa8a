#include "checkpoints/tensor_slice.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace eellm {

TensorSlice WholeSlice(const Shape& shape) {
  return TensorSlice{shape, std::vector<int64_t>(shape.size(), 0), shape};
}

TensorSlice TpSlice(const Shape& local, int split_dim, int tp_rank, int tp_size, int replicas) {
  TensorSlice s = WholeSlice(local);
  if (split_dim < 0 || tp_size <= 1) return s;
  EE_CHECK(split_dim < static_cast<int>(local.size()) && replicas >= 1 && tp_size % replicas == 0,
           "split_dim ", split_dim, " of shape ", ShapeToString(local), ", replicas ", replicas);
  s.global_shape[split_dim] *= tp_size / replicas;
  s.start[split_dim] = static_cast<int64_t>(tp_rank / replicas) * local[split_dim];
  return s;
}

bool SliceInBounds(const TensorSlice& s) {
  if (s.start.size() != s.global_shape.size() || s.shape.size() != s.global_shape.size()) {
    return false;
  }
  for (size_t d = 0; d < s.shape.size(); ++d) {
    if (s.start[d] < 0 || s.shape[d] < 0 || s.global_shape[d] < 0 ||
        s.start[d] > s.global_shape[d] - s.shape[d]) {
      return false;
    }
  }
  return true;
}

namespace {
// Per-dimension intersection [lo, hi) in global coordinates; false when empty.
bool Intersect(const TensorSlice& a, const TensorSlice& b, std::vector<int64_t>& lo,
               std::vector<int64_t>& hi) {
  const size_t r = a.global_shape.size();
  lo.resize(r);
  hi.resize(r);
  for (size_t d = 0; d < r; ++d) {
    lo[d] = std::max(a.start[d], b.start[d]);
    hi[d] = std::min(a.start[d] + a.shape[d], b.start[d] + b.shape[d]);
    if (hi[d] <= lo[d]) return false;
  }
  return true;
}
}  // namespace

int64_t OverlapElements(const TensorSlice& a, const TensorSlice& b) {
  std::vector<int64_t> lo, hi;
  if (a.global_shape != b.global_shape || !Intersect(a, b, lo, hi)) return 0;
  int64_t n = 1;
  for (size_t d = 0; d < lo.size(); ++d) n *= hi[d] - lo[d];
  return n;
}

int64_t CopyOverlap(const TensorSlice& src, const float* src_data, const TensorSlice& dst,
                    float* dst_data) {
  EE_CHECK(src.global_shape == dst.global_shape, "CopyOverlap: global shapes differ");
  const size_t r = src.global_shape.size();
  if (r == 0) {  // scalars
    dst_data[0] = src_data[0];
    return 1;
  }
  std::vector<int64_t> lo, hi;
  if (!Intersect(src, dst, lo, hi)) return 0;
  // Row-major strides of both blocks.
  std::vector<int64_t> ss(r, 1), ds(r, 1);
  for (size_t d = r - 1; d > 0; --d) {
    ss[d - 1] = ss[d] * src.shape[d];
    ds[d - 1] = ds[d] * dst.shape[d];
  }
  const int64_t run = hi[r - 1] - lo[r - 1];  // contiguous in both along the last dimension
  std::vector<int64_t> idx(lo.begin(), lo.end());
  int64_t copied = 0;
  while (true) {
    int64_t so = 0, doff = 0;
    for (size_t d = 0; d < r; ++d) {
      so += (idx[d] - src.start[d]) * ss[d];
      doff += (idx[d] - dst.start[d]) * ds[d];
    }
    std::copy_n(src_data + so, run, dst_data + doff);
    copied += run;
    // Next index over all dimensions but the last.
    int d = static_cast<int>(r) - 2;
    for (; d >= 0; --d) {
      if (++idx[d] < hi[d]) break;
      idx[d] = lo[d];
    }
    if (d < 0) break;
  }
  return copied;
}

std::string SliceToString(const TensorSlice& s) {
  std::string out = "[";
  for (size_t d = 0; d < s.shape.size(); ++d) {
    absl::StrAppend(&out, d ? ", " : "", s.start[d], ":", s.start[d] + s.shape[d]);
  }
  return out + "]";
}

}  // namespace eellm
