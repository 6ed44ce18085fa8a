// DeviceMem: the device buffers of one op call in the parity tests (tests/gpu/*_parity_test.cc),
// each followed by a guard zone that GuardsIntact checks.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "gtest/gtest.h"

namespace eellm::testing {

// The device buffers of one op call on one backend: inputs copied from the host, outputs
// poisoned or pre-filled; each is followed by a guard zone of known bytes. Frees all at the end.
class DeviceMem {
 public:
  static constexpr size_t kGuardBytes = 256;
  static constexpr uint8_t kGuardByte = 0xA5;

  explicit DeviceMem(Backend* be) : be_(be) {}
  ~DeviceMem() {
    for (const auto& b : bufs_) be_->Free(b.first);
  }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;

  template <typename T>
  T* Put(const std::vector<T>& host) {
    const size_t bytes = host.size() * sizeof(T);
    std::vector<uint8_t> staging(bytes + kGuardBytes, kGuardByte);
    if (bytes > 0) std::memcpy(staging.data(), host.data(), bytes);
    void* p = be_->Alloc(staging.size());
    be_->CopyFromHost(p, staging.data(), staging.size());
    bufs_.emplace_back(p, bytes);
    return static_cast<T*>(p);
  }
  float* Nan(size_t n) {
    return Put(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()));
  }
  // A bf16 operand holding `host` rounded to bf16 (NaN stays NaN).
  Operand PutBf16(const std::vector<float>& host) {
    std::vector<bf16> bits(host.size());
    for (size_t i = 0; i < host.size(); ++i) bits[i] = FloatToBf16(host[i]);
    return Operand(Put(bits), DType::kBF16);
  }
  template <typename T>
  std::vector<T> Get(const T* p, size_t n) {
    std::vector<T> host(n);
    be_->Synchronize();
    if (n > 0) be_->CopyToHost(host.data(), p, n * sizeof(T));
    return host;
  }
  // An operand's n values as fp32 (bf16 ones converted).
  std::vector<float> Get(ConstOperand p, size_t n) {
    std::vector<float> host(n);
    be_->Synchronize();
    if (n > 0) OperandToHost(be_, host.data(), p, n);
    return host;
  }
  // Checks that no op wrote past the end of any buffer.
  ::testing::AssertionResult GuardsIntact() {
    be_->Synchronize();
    std::vector<uint8_t> guard(kGuardBytes);
    for (size_t i = 0; i < bufs_.size(); ++i) {
      be_->CopyToHost(guard.data(), static_cast<uint8_t*>(bufs_[i].first) + bufs_[i].second,
                      kGuardBytes);
      for (size_t j = 0; j < kGuardBytes; ++j) {
        if (guard[j] != kGuardByte) {
          return ::testing::AssertionFailure()
                 << "buffer " << i << " (" << bufs_[i].second << " bytes) overwritten " << j
                 << " bytes past its end";
        }
      }
    }
    return ::testing::AssertionSuccess();
  }

 private:
  Backend* be_;
  std::vector<std::pair<void*, size_t>> bufs_;  // pointer, payload bytes
};

}  // namespace eellm::testing
