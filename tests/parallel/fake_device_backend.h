// FakeDeviceBackend: a test Backend that claims to be a GPU (Device::kCuda) but keeps its
// buffers in host memory, stored XOR-ed with a per-instance key. Only the memory functions
// work. A communicator that used such "device" pointers directly (instead of staging through
// CopyToHost / CopyFromHost) would reduce encoded bytes, or hand one rank's encoding to another
// rank with a different key, and produce wrong values: the tests give every rank its own key.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "engine/backend.h"

namespace eellm::testing {

class FakeDeviceBackend final : public Backend {
 public:
  explicit FakeDeviceBackend(uint8_t key) : key_(key) {}

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "fake-device"; }

  void* Alloc(size_t bytes) override { return std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }
  void Free(void* p) override { std::free(p); }
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override {
    ++to_host_calls;
    Xor(static_cast<uint8_t*>(host_dst), static_cast<const uint8_t*>(src), bytes);
  }
  void CopyFromHost(void* dst, const void* host_src, size_t bytes) override {
    ++from_host_calls;
    Xor(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(host_src), bytes);
  }
  void Copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void Synchronize() override {}

  int to_host_calls = 0, from_host_calls = 0;

  // Not used by communicators.
  void Fill(float*, size_t, float) override { std::abort(); }
  void Add(float*, const float*, const float*, size_t) override { std::abort(); }
  void Axpy(float*, float, const float*, size_t) override { std::abort(); }
  void Scale(Operand, float, size_t) override { std::abort(); }
  void ToFloat(float*, ConstOperand, size_t) override { std::abort(); }
  double SumSquares(const float*, size_t) override { std::abort(); }
  void EmbeddingForward(float*, const int32_t*, const float*, int, int) override { std::abort(); }
  void EmbeddingBackward(float*, const int32_t*, const float*, int, int) override { std::abort(); }
  void EmbeddingAdd(float*, const int32_t*, const float*, int, int) override { std::abort(); }
  void Linear(Operand, ConstOperand, const float*, const float*, int, int, int, bool) override {
    std::abort();
  }
  void LinearBackward(Operand, float*, float*, ConstOperand, ConstOperand, const float*, int, int,
                      int, bool) override {
    std::abort();
  }
  void LayerNormForward(Operand, float*, float*, const float*, const float*, const float*, int, int,
                        float) override {
    std::abort();
  }
  void LayerNormBackward(float*, const float*, float*, float*, const float*, const float*,
                         const float*, const float*, const float*, int, int) override {
    std::abort();
  }
  void RmsNormForward(Operand, float*, const float*, const float*, int, int, float) override {
    std::abort();
  }
  void RmsNormBackward(float*, const float*, float*, const float*, const float*, const float*,
                       const float*, int, int) override {
    std::abort();
  }
  void GeluForward(Operand, ConstOperand, size_t) override { std::abort(); }
  void GeluBackward(Operand, ConstOperand, ConstOperand, size_t) override { std::abort(); }
  void SwiGluForward(Operand, ConstOperand, ConstOperand, int, int, int) override { std::abort(); }
  void SwiGluBackward(Operand, Operand, ConstOperand, ConstOperand, ConstOperand, int, int,
                      int) override {
    std::abort();
  }
  void DropoutAdd(float*, const float*, const float*, int, int, float, uint64_t, int64_t) override {
    std::abort();
  }
  void DropoutBackward(float*, const float*, int, int, float, uint64_t, int64_t) override {
    std::abort();
  }
  void RopeForward(Operand, const int32_t*, int, int, int, int, const RopeParams&) override {
    std::abort();
  }
  void RopeBackward(Operand, const int32_t*, int, int, int, int, const RopeParams&) override {
    std::abort();
  }
  void AttentionForward(Operand, float*, ConstOperand, ConstOperand, ConstOperand, int, int, int,
                        int, int, int, int, int, int, int) override {
    std::abort();
  }
  void PagedAttentionForward(Operand, ConstOperand, ConstOperand, ConstOperand, const KvPageTable&,
                             int, int, int, int, int, int) override {
    std::abort();
  }
  void AttentionBackward(Operand, Operand, Operand, ConstOperand, ConstOperand, const float*,
                         ConstOperand, ConstOperand, ConstOperand, int, int, int, int, int, int,
                         int) override {
    std::abort();
  }
  void CrossEntropy(float*, float*, Operand, ConstOperand, const int32_t*, const float*, bool, int,
                    int) override {
    std::abort();
  }
  void EmbeddingForwardRange(float*, const int32_t*, const float*, int, int, int, int) override {
    std::abort();
  }
  void EmbeddingBackwardRange(float*, const int32_t*, const float*, int, int, int, int) override {
    std::abort();
  }
  void RowMax(float*, ConstOperand, int, int) override { std::abort(); }
  void SumExpAndTarget(float*, float*, ConstOperand, const float*, const int32_t*, int, int,
                       int) override {
    std::abort();
  }
  void CrossEntropyFromStats(float*, float*, const float*, const float*, const float*,
                             int) override {
    std::abort();
  }
  void CrossEntropyGradRange(Operand, ConstOperand, const float*, const float*, const int32_t*,
                             const float*, bool, int, int, int) override {
    std::abort();
  }
  void AdamW(float*, const float*, float*, float*, size_t, float, float, float, float, float,
             int) override {
    std::abort();
  }

 private:
  void Xor(uint8_t* dst, const uint8_t* src, size_t bytes) const {
    for (size_t i = 0; i < bytes; ++i) dst[i] = src[i] ^ key_;
  }
  uint8_t key_;
};

}  // namespace eellm::testing
