// cuDNN's attention graphs (engine/cuda/cudnn_attention.cc) under the CPU emulation of CUDA,
// where they run on the interpreter of tests/gpu/emu/emulated_cudnn_graph.cc, against the
// reference that writes out their arithmetic with every rounding (cudnn_graph_reference.h): the
// deterministic backward and the accumulating one. (On a GPU cuDNN's kernels round as they
// choose: OperandParity.AttentionWritesAndReadsBf16Output holds them to the bf16 bound there.)
#include <cstddef>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/bf16_reference_backend.h"
#include "tests/gpu/device_mem.h"
#include "tests/gpu/parity_backend.h"
#include "tests/gpu/parity_tolerances.h"
#include "tests/scoped_env.h"

namespace eellm {
namespace {

using cpu_test::InRows;
using cpu_test::OutOfRows;
using cpu_test::RandVec;
using testing::Close;
using testing::DeviceMem;
using testing::RoundedToBf16;
using testing::SameRoundingsButRareFlips;
using testing::Tol;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// cuDNN's attention graphs on `dev` against the reference that writes out their arithmetic
// (cudnn_graph_reference.h): GQA and not, head dims 64 and 128, in fused q, k, v rows; the
// backward `backward_calls` times, each with another dO (a state one call leaves behind, such as
// an accumulator, would show in the next).
void ExpectCudnnGraphsMatchTheirReference(Backend* dev, int backward_calls, Rng& rng) {
  const Tol kSameRounding{4e-3, 1e-5};
  testing::Bf16ReferenceBackend ref(
      std::make_unique<CpuBackend>(), [](int) { return false; }, [](int) { return true; });
  for (int dh : {64, 128}) {
    for (int hkv : {1, 3}) {
      SCOPED_TRACE(::testing::Message() << "head_dim " << dh << ", kv heads " << hkv);
      const int b = 2, t = 37, hq = 3, rows = b * t, qc = hq * dh, kc = hkv * dh;
      const size_t nq = static_cast<size_t>(rows) * qc, nkv = static_cast<size_t>(rows) * kc;
      const size_t nl = static_cast<size_t>(b) * hq * t;
      const auto q = RoundedToBf16(RandVec(rng, nq)), k = RoundedToBf16(RandVec(rng, nkv)),
                 v = RoundedToBf16(RandVec(rng, nkv));
      // The reference on dense tensors; the device on rows [q | k | v] (the model's layout).
      DeviceMem r(&ref), d(dev);
      const std::vector<float> nan_q(nq, kNaN), nan_kv(nkv, kNaN);
      const Operand q_r = r.PutBf16(q), k_r = r.PutBf16(k), v_r = r.PutBf16(v);
      const Operand out_r = r.PutBf16(nan_q), out_d = d.PutBf16(nan_q);
      float* lse_r = r.Put(std::vector<float>(nl, kNaN));
      float* lse_d = d.Put(std::vector<float>(nl, kNaN));
      const int stride = qc + 2 * kc;
      const Operand x = d.PutBf16(InRows({&q, &k, &v}, rows, stride, kNaN));
      ref.AttentionForward(out_r, lse_r, q_r, k_r, v_r, b, t, t, t, hq, hkv, dh, 0, qc, kc);
      dev->AttentionForward(out_d, lse_d, x, x.At(qc), x.At(qc + kc), b, t, t, t, hq, hkv, dh, 0,
                            stride, stride);
      EXPECT_TRUE(SameRoundingsButRareFlips(d.Get(out_d, nq), r.Get(out_r, nq), kSameRounding))
          << "out";
      EXPECT_TRUE(Close(d.Get(lse_d, nl), r.Get(lse_r, nl), testing::kGemmFp32)) << "lse";
      for (int call = 0; call < backward_calls; ++call) {
        SCOPED_TRACE(::testing::Message() << "backward call " << call);
        const auto dout = RoundedToBf16(RandVec(rng, nq));
        const Operand dq_r = r.PutBf16(nan_q), dk_r = r.PutBf16(nan_kv), dv_r = r.PutBf16(nan_kv);
        const Operand g = d.PutBf16(std::vector<float>(static_cast<size_t>(rows) * stride, kNaN));
        ref.AttentionBackward(dq_r, dk_r, dv_r, r.PutBf16(dout), out_r, lse_r, q_r, k_r, v_r, b, t,
                              hq, hkv, dh, qc, kc);
        dev->AttentionBackward(g, g.At(qc), g.At(qc + kc), d.PutBf16(dout), out_d, lse_d, x,
                               x.At(qc), x.At(qc + kc), b, t, hq, hkv, dh, stride, stride);
        const auto got =  // dq, dk, dv
            OutOfRows(d.Get(g, static_cast<size_t>(rows) * stride), rows, stride, {qc, kc, kc});
        EXPECT_TRUE(SameRoundingsButRareFlips(got[0], r.Get(dq_r, nq), kSameRounding)) << "dq";
        EXPECT_TRUE(SameRoundingsButRareFlips(got[1], r.Get(dk_r, nkv), kSameRounding)) << "dk";
        EXPECT_TRUE(SameRoundingsButRareFlips(got[2], r.Get(dv_r, nkv), kSameRounding)) << "dv";
      }
      EXPECT_TRUE(d.GuardsIntact());
    }
  }
}

// Both backward graphs agree with the reference to fp32 noise; a graph that drops a rounding, a
// scale or the mask, or sums another group, does not.
class CudnnGraphs : public testing::DeviceParityTest {
 protected:
  void SetUp() override {
    DeviceParityTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    if (!testing::ParityBackendRunsEmulatedCudnnGraphs(64)) {
      GTEST_SKIP() << "runs where cuDNN's graphs run on the emulation's interpreter "
                      "(emulated-cuda-bf16w)";
    }
  }
  Rng rng_{7};
};

// The deterministic backward (dQ written by its matmul), which the training path runs (its
// shapes are this test's own: their plans are made here, and stderr names them).
TEST_F(CudnnGraphs, MatchTheirRoundingReference) {
  ::testing::internal::CaptureStderr();
  ExpectCudnnGraphsMatchTheirReference(dev_, 2, rng_);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("cuDNN attention backward (b 2, t 37"), std::string::npos) << log;
  EXPECT_EQ(log.find("fp32 dQ accumulator"), std::string::npos) << log;
}

// EELLM_CUDNN_ATTENTION=accumulating: the backward whose dQ cuDNN sums by atomics into an fp32
// accumulator in our workspace, which each call must zero first (the interpreter adds into it as
// the atomics do), on a backend of its own made under that setting.
TEST_F(CudnnGraphs, AccumulatingBackwardMatchesTheReferenceCallAfterCall) {
  auto accumulating = [] {
    testing::ScopedEnv env("EELLM_CUDNN_ATTENTION", "accumulating");  // read as it is made
    return MakeBackendOrEmulated("emulated-cuda-bf16w");
  }();
  ASSERT_TRUE(accumulating.ok()) << accumulating.status();
  ::testing::internal::CaptureStderr();
  ExpectCudnnGraphsMatchTheirReference(accumulating->get(), 3, rng_);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("backward (fp32 dQ accumulator"), std::string::npos) << log;
  EXPECT_EQ(log.find("backward (b"), std::string::npos) << "the deterministic backward ran\n"
                                                        << log;
}

}  // namespace
}  // namespace eellm
