// The backend the parity tests check against the CPU, shared by every parity test file of the
// executable so that one process makes one device backend: named by EELLM_PARITY_BACKEND
// (default "cuda"; "emulated-cuda" and "emulated-cuda-bf16" are the CUDA backend's sources
// under the CPU emulation of tests/gpu/emu).
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "engine/backend.h"
#include "gtest/gtest.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/gpu/require_gpu.h"

namespace eellm::testing {

// The name in EELLM_PARITY_BACKEND, or "cuda".
inline std::string ParityBackendName() {
  const char* env = std::getenv("EELLM_PARITY_BACKEND");
  return env != nullptr && *env != '\0' ? env : "cuda";
}

// Backends whose name has "bf16" round GEMM operands to bf16 and get looser GEMM tolerances.
inline bool ParityBackendHasBf16Gemms() {
  return ParityBackendName().find("bf16") != std::string::npos;
}

// Backends whose name ends in "bf16w" also store operands in bf16 (operand_dtype()).
inline bool ParityBackendHasBf16Operands() {
  const std::string name = ParityBackendName();
  return name.size() >= 5 && name.compare(name.size() - 5, 5, "bf16w") == 0;
}

// Whether EELLM_CUDNN_ATTENTION=0 turned cuDNN's attention off (the fused kernels run it).
inline bool CudnnAttentionOff() {
  const char* env = std::getenv("EELLM_CUDNN_ATTENTION");
  return env != nullptr && std::strcmp(env, "0") == 0;
}

// Whether the backend under test runs cuDNN's attention graphs on the CPU emulation's interpreter
// (tests/gpu/emu/emulated_cudnn_graph.cc), whose arithmetic cudnn_graph_reference.h writes out:
// "emulated-cuda-bf16w" (bf16 operands, which the graphs take) unless EELLM_CUDNN_ATTENTION=0,
// at the head dims CudnnAttention::Offered gives them (multiples of 8 in [64, 128]).
inline bool ParityBackendRunsEmulatedCudnnGraphs(int head_dim) {
  return ParityBackendName() == "emulated-cuda-bf16w" && !CudnnAttentionOff() &&
         head_dim % 8 == 0 && head_dim >= 64 && head_dim <= 128;
}

// The backend under test, made once per process and never destroyed (a CUDA backend must not
// be torn down during static destruction). Null when it cannot be made, with *why set: the tests
// then skip where the backend is unavailable (no GPU, a build without CUDA) and fail where the
// name is wrong (a misspelt EELLM_PARITY_BACKEND must not pass silently), *misnamed set.
inline Backend* DeviceUnderTest(std::string* why, bool* misnamed) {
  static std::string* reason = new std::string;
  static bool bad_name = false;
  static Backend* device = [] {
    const std::string name = ParityBackendName();
    auto be = MakeBackendOrEmulated(name);
    if (be.ok()) return be->release();
    bad_name = absl::IsInvalidArgument(be.status());
    *reason = bad_name ? "EELLM_PARITY_BACKEND=" + name + ": " + be.status().ToString()
                       : (name == "cuda" ? std::string("no CUDA GPU") : "no " + name + " device") +
                             ": parity tests skipped (" + be.status().ToString() + ")";
    return static_cast<Backend*>(nullptr);
  }();
  *why = *reason;
  *misnamed = bad_name;
  return device;
}

// Base of the parity fixtures: dev_ is the backend under test; a test skips where it cannot be
// made and fails where its name is wrong (see DeviceUnderTest).
class DeviceParityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    bool misnamed = false;
    dev_ = DeviceUnderTest(&why, &misnamed);
    if (misnamed) FAIL() << why;
    if (dev_ == nullptr && GpuRequired()) FAIL() << why << " (EELLM_REQUIRE_GPU is set)";
    if (dev_ == nullptr) GTEST_SKIP() << why;
  }
  Backend* dev_ = nullptr;
};

}  // namespace eellm::testing
