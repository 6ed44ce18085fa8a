// Operand: an activation that tensor cores multiply: what Linear reads as `in` (the output of a
// norm, of attention or of an activation function, kept for the backward's weight gradient) and
// what attention reads (q, k, v as Linear writes them, the KV cache). It is stored in fp32, or in
// bf16 on a backend whose operand_dtype() is bf16 (cuda-bf16w): its GEMMs and attention kernels
// then read it as it is, without a conversion pass, and it takes half the memory and bandwidth.
// Model code allocates operands in the backend's dtype and offsets them with At(); an fp32
// pointer converts implicitly, so fp32 call sites (the CPU backend, tests) read as before.
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine/core/dtype.h"
#include "engine/core/status.h"

namespace eellm {

struct Operand {
  void* data = nullptr;
  DType dtype = DType::kF32;

  Operand() = default;
  Operand(float* p) : data(p) {}  // NOLINT(google-explicit-constructor): fp32 operands
  Operand(void* p, DType t) : data(p), dtype(t) {}

  // The operand starting `elements` further on.
  Operand At(size_t elements) const {
    return {static_cast<char*>(data) + elements * DTypeSize(dtype), dtype};
  }
  bool is_bf16() const { return dtype == DType::kBF16; }
  float* f32() const {
    EE_CHECK(dtype == DType::kF32, "an fp32 operand was expected, got ", DTypeName(dtype));
    return static_cast<float*>(data);
  }
  uint16_t* bf16_bits() const {
    EE_CHECK(dtype == DType::kBF16, "a bf16 operand was expected, got ", DTypeName(dtype));
    return static_cast<uint16_t*>(data);
  }
};

struct ConstOperand {
  const void* data = nullptr;
  DType dtype = DType::kF32;

  ConstOperand() = default;
  ConstOperand(const float* p) : data(p) {}  // NOLINT(google-explicit-constructor)
  ConstOperand(const Operand& o) : data(o.data), dtype(o.dtype) {}  // NOLINT
  ConstOperand(const void* p, DType t) : data(p), dtype(t) {}

  ConstOperand At(size_t elements) const {
    return {static_cast<const char*>(data) + elements * DTypeSize(dtype), dtype};
  }
  bool is_bf16() const { return dtype == DType::kBF16; }
  const float* f32() const {
    EE_CHECK(dtype == DType::kF32, "an fp32 operand was expected, got ", DTypeName(dtype));
    return static_cast<const float*>(data);
  }
  const uint16_t* bf16_bits() const {
    EE_CHECK(dtype == DType::kBF16, "a bf16 operand was expected, got ", DTypeName(dtype));
    return static_cast<const uint16_t*>(data);
  }
};

}  // namespace eellm
