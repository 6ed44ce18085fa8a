// Buffer (owning, move-only device memory) and Tensor (non-owning view: pointer, shape, dtype,
// device). Tensors are always row-major contiguous views into a Buffer or an arena.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/dtype.h"

namespace eellm {

enum class Device { kCpu, kCuda };

using Shape = std::vector<int64_t>;

inline int64_t NumElements(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}
std::string ShapeToString(const Shape& s);

class Backend;

// Owning allocation on one device, obtained from a Backend. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* backend, size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  float* f32() const { return static_cast<float*>(data_); }

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Non-owning view of contiguous memory.
struct Tensor {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;

  int64_t numel() const { return NumElements(shape); }
  size_t bytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  float* f32() const { return static_cast<float*>(data); }
};

}  // namespace eellm
