// TensorSlice: where a stored block of a tensor sits inside the whole (global) tensor, and the
// copy of the overlap between two blocks. This is what lets a checkpoint saved under one
// tensor-parallel layout load under another: each rank stores its block with its position, and
// a loader assembles the block it needs from whichever stored blocks overlap it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/tensor/tensor.h"

namespace eellm {

struct TensorSlice {
  Shape global_shape;          // shape of the whole tensor
  std::vector<int64_t> start;  // per dimension: index of the block's first element
  Shape shape;                 // shape of the block

  bool whole() const { return shape == global_shape; }
  bool operator==(const TensorSlice& o) const {
    return global_shape == o.global_shape && start == o.start && shape == o.shape;
  }
};

// The whole tensor of shape `shape` as a slice.
TensorSlice WholeSlice(const Shape& shape);

// The block held by tensor-parallel rank `tp_rank` of `tp_size` when the whole tensor is split
// into tp_size / replicas equal contiguous blocks along `split_dim`, each held by `replicas`
// consecutive ranks (-1: every rank holds the whole tensor, whose shape is `local`). `local` is
// the block's shape.
TensorSlice TpSlice(const Shape& local, int split_dim, int tp_rank, int tp_size, int replicas = 1);

// True when `s` lies inside its global shape (same ranks, non-negative, in bounds).
bool SliceInBounds(const TensorSlice& s);

// Number of elements shared by two blocks of the same global tensor.
int64_t OverlapElements(const TensorSlice& a, const TensorSlice& b);

// Copies the elements of block `src` (data `src_data`, row-major in src.shape) that fall inside
// block `dst` into `dst_data` (row-major in dst.shape); returns how many were copied. Both
// slices must have the same global shape.
int64_t CopyOverlap(const TensorSlice& src, const float* src_data, const TensorSlice& dst,
                    float* dst_data);

// "[0:64, 128:256]" style description of the block (for messages).
std::string SliceToString(const TensorSlice& s);

}  // namespace eellm
