#include "engine/tensor/tensor.h"

#include "absl/strings/str_join.h"
#include "engine/backend.h"

namespace eellm {

std::string ShapeToString(const Shape& s) { return "[" + absl::StrJoin(s, ", ") + "]"; }

Buffer::Buffer(Backend* backend, size_t bytes) : backend_(backend), bytes_(bytes) {
  data_ = bytes ? backend->Alloc(bytes) : nullptr;
}

Buffer::~Buffer() {
  if (data_) backend_->Free(data_);
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (data_) backend_->Free(data_);
    backend_ = std::exchange(o.backend_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

}  // namespace eellm
