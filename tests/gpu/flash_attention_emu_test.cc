// The fused attention kernels of engine/cuda/flash_attention.cu, run on the CPU under the CUDA
// emulation of tests/gpu/emu, against the CPU backend (the oracle) with the bf16 GEMM tolerance
// of the parity suite. This checks the kernels' logic (tiling, causal and cache masking, GQA
// head mapping, online softmax, the recomputing backward, barriers) on every machine; the gpu
// parity suite checks them on the device. Outputs start as NaN and are followed by guard values
// that must survive (every element written, nothing past the end).
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/parity_tolerances.h"

// The kernels as built for the emulation (library eellm_cuda_emulated), in eellm::cuda_emulated.
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_kernels.h"
// clang-format on
#undef cuda
#undef CudaBackend
#undef MakeCudaBackend

namespace eellm {
namespace {

using cpu_test::RandVec;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kGuard = 12345.0f;
constexpr size_t kGuardCount = 64;

// A buffer of n values followed by kGuardCount guard values.
struct Guarded {
  std::vector<float> data;
  explicit Guarded(size_t n, float fill = kNaN) : data(n + kGuardCount, kGuard) {
    std::fill(data.begin(), data.begin() + n, fill);
  }
  float* get() { return data.data(); }
  std::vector<float> values() const { return {data.begin(), data.end() - kGuardCount}; }
  bool guard_intact() const {
    for (size_t i = data.size() - kGuardCount; i < data.size(); ++i) {
      if (data[i] != kGuard) return false;
    }
    return true;
  }
};

struct Case {
  int b, hq, hkv, d, tq, q_offset, tk_cap;
  int tk() const { return q_offset + tq; }
  bool training() const { return q_offset == 0 && tk_cap == tq; }
};
const Case kTrainingCases[] = {
    // Training form: GQA, MQA, MHA; inside one tile, exactly one tile, partial last tiles.
    {2, 4, 2, 32, 5, 0, 5},      {2, 2, 2, 32, 64, 0, 64}, {1, 4, 1, 64, 70, 0, 70},
    {1, 4, 2, 128, 130, 0, 130}, {1, 2, 1, 64, 2, 0, 2},
};
const Case kCacheCases[] = {
    // KV-cache forms: prefill into a larger cache, one-token and several-token decode.
    {2, 4, 2, 32, 5, 0, 12},
    {2, 4, 2, 32, 1, 7, 16},
    {1, 4, 4, 64, 5, 28, 40},
    {1, 4, 2, 128, 2, 150, 200},
};

class FlashAttentionEmulation : public ::testing::TestWithParam<Case> {
 protected:
  Rng rng_{20261201};
  CpuBackend cpu_;
};
using FlashForwardEmulation = FlashAttentionEmulation;
using FlashBackwardEmulation = FlashAttentionEmulation;

std::string CaseName(const ::testing::TestParamInfo<Case>& p) {
  const Case& a = p.param;
  return "b" + std::to_string(a.b) + "_hq" + std::to_string(a.hq) + "_hkv" + std::to_string(a.hkv) +
         "_d" + std::to_string(a.d) + "_tq" + std::to_string(a.tq) + "_off" +
         std::to_string(a.q_offset) + "_cap" + std::to_string(a.tk_cap);
}

TEST_P(FlashForwardEmulation, MatchesCpu) {
  const Case a = GetParam();
  ASSERT_TRUE(cuda_emulated::FlashAttentionSupports(a.d));
  const size_t nq = static_cast<size_t>(a.b) * a.tq * a.hq * a.d;
  const size_t row = static_cast<size_t>(a.hkv) * a.d;
  const size_t nl = static_cast<size_t>(a.b) * a.hq * a.tq;
  const auto q = RandVec(rng_, nq, 1.5);
  auto k = RandVec(rng_, a.b * a.tk_cap * row), v = RandVec(rng_, k.size());
  for (int bi = 0; bi < a.b; ++bi) {  // cache rows past tk are not valid
    for (size_t i = (bi * a.tk_cap + a.tk()) * row; i < (bi + 1) * a.tk_cap * row; ++i) {
      k[i] = v[i] = kNaN;
    }
  }
  std::vector<float> want(nq), want_lse(nl);
  cpu_.AttentionForward(want.data(), want_lse.data(), q.data(), k.data(), v.data(), a.b, a.tq,
                        a.tk(), a.tk_cap, a.hq, a.hkv, a.d, a.q_offset);
  for (bool with_lse : {true, false}) {
    Guarded out(nq), lse(nl);
    ASSERT_EQ(cuda_emulated::FlashAttentionForward(out.get(), with_lse ? lse.get() : nullptr,
                                                   q.data(), k.data(), v.data(), a.b, a.tq, a.tk(),
                                                   a.tk_cap, a.hq, a.hkv, a.d, a.q_offset, nullptr),
              cudaSuccess);
    EXPECT_TRUE(testing::Close(out.values(), want, testing::kGemmBf16)) << "out";
    EXPECT_TRUE(out.guard_intact());
    if (with_lse) {
      EXPECT_TRUE(testing::Close(lse.values(), want_lse, testing::kGemmBf16)) << "lse";
    }
    EXPECT_TRUE(lse.guard_intact());
  }
}

TEST_P(FlashBackwardEmulation, MatchesCpu) {
  const Case a = GetParam();
  ASSERT_TRUE(a.training());
  const int t = a.tq;
  const size_t nq = static_cast<size_t>(a.b) * t * a.hq * a.d;
  const size_t nkv = static_cast<size_t>(a.b) * t * a.hkv * a.d;
  const size_t nl = static_cast<size_t>(a.b) * a.hq * t;
  const auto q = RandVec(rng_, nq, 1.5), k = RandVec(rng_, nkv), v = RandVec(rng_, nkv);
  const auto dout = RandVec(rng_, nq);
  std::vector<float> out(nq), lse(nl);
  cpu_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), a.b, t, t, t, a.hq,
                        a.hkv, a.d, 0);
  std::vector<float> want_dq(nq), want_dk(nkv), want_dv(nkv);
  cpu_.AttentionBackward(want_dq.data(), want_dk.data(), want_dv.data(), dout.data(), out.data(),
                         lse.data(), q.data(), k.data(), v.data(), a.b, t, a.hq, a.hkv, a.d);
  Guarded dq(nq), dk(nkv), dv(nkv), dsum(nl);
  ASSERT_EQ(cuda_emulated::FlashAttentionBackward(
                dq.get(), dk.get(), dv.get(), dout.data(), out.data(), lse.data(), dsum.get(),
                q.data(), k.data(), v.data(), a.b, t, a.hq, a.hkv, a.d, nullptr),
            cudaSuccess);
  EXPECT_TRUE(testing::Close(dq.values(), want_dq, testing::kGemmBf16)) << "dq";
  EXPECT_TRUE(testing::Close(dk.values(), want_dk, testing::kGemmBf16)) << "dk";
  EXPECT_TRUE(testing::Close(dv.values(), want_dv, testing::kGemmBf16)) << "dv";
  EXPECT_TRUE(dq.guard_intact() && dk.guard_intact() && dv.guard_intact() && dsum.guard_intact());
}

INSTANTIATE_TEST_SUITE_P(Training, FlashForwardEmulation, ::testing::ValuesIn(kTrainingCases),
                         CaseName);
INSTANTIATE_TEST_SUITE_P(KvCache, FlashForwardEmulation, ::testing::ValuesIn(kCacheCases),
                         CaseName);
// The backward exists for the training form only.
INSTANTIATE_TEST_SUITE_P(Training, FlashBackwardEmulation, ::testing::ValuesIn(kTrainingCases),
                         CaseName);

TEST(FlashAttentionEmulationLimits, OtherHeadDimsAreNotClaimed) {
  for (int d : {8, 16, 20, 48, 96, 256}) EXPECT_FALSE(cuda_emulated::FlashAttentionSupports(d));
}

}  // namespace
}  // namespace eellm
