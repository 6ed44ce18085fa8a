// Helpers for the MPI test suite (tests/parallel/*_mpi_test.cc, communicator_test.cc): this
// process's place in the job and a buffer on the backend under test.
#pragma once

#include <cstring>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "parallel/comm/mpi_communicator.h"

namespace eellm::testing {

struct WorldInfo {
  int rank = 0, size = 1;
};

// Rank and size in MPI_COMM_WORLD. The first call is collective (it creates a communicator).
inline const WorldInfo& World() {
  static const WorldInfo info = [] {
    auto world = MpiCommunicator::World(nullptr);
    return WorldInfo{world->rank(), world->size()};
  }();
  return info;
}

// A buffer of `backend` (host memory when null), filled and read through the backend's copies.
class DevBuf {
 public:
  DevBuf(Backend* backend, size_t bytes) : backend_(backend), bytes_(bytes) {
    data_ = backend_ ? backend_->Alloc(bytes + 1) : ::operator new(bytes + 1);
  }
  ~DevBuf() { backend_ ? backend_->Free(data_) : ::operator delete(data_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;

  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }

  template <class T>
  void Put(const std::vector<T>& v, size_t offset_elems = 0) {
    void* dst = static_cast<T*>(data_) + offset_elems;
    if (backend_) {
      backend_->CopyFromHost(dst, v.data(), v.size() * sizeof(T));
    } else {
      std::memcpy(dst, v.data(), v.size() * sizeof(T));
    }
  }
  template <class T>
  std::vector<T> Get(size_t count) const {
    std::vector<T> v(count);
    if (backend_) {
      backend_->CopyToHost(v.data(), data_, count * sizeof(T));
    } else {
      std::memcpy(v.data(), data_, count * sizeof(T));
    }
    return v;
  }

 private:
  Backend* backend_;
  size_t bytes_;
  void* data_;
};

}  // namespace eellm::testing
