// EELLM_GEMM_TUNE=1 on the mixed-precision CUDA backend, under the CPU emulation: a large GEMM
// shape's first run times cuBLASLt's candidate algorithms (the emulation offers two that compute
// alike) with D in scratch, so every result must be the untuned backend's bits. Covered: a Linear
// with a bias (cuBLASLt's epilogue) and one without (routed to cuBLASLt only when tuning),
// LinearResidual (C apart from D), and a LinearBackward whose weight gradient accumulates into D
// and whose bias gradient comes from the epilogue (timing runs into D would add the product
// again).
#include <cstring>
#include <vector>

#include "engine/core/dtype.h"
#include "engine/core/rng.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/scoped_env.h"

namespace eellm {
namespace {

// The outputs of the GEMMs above on a fresh emulated cuda-bf16w backend.
std::vector<std::vector<float>> RunGemms(bool tune) {
  auto made = [&] {
    testing::ScopedEnv env("EELLM_GEMM_TUNE", tune ? "1" : nullptr);  // read as it is made
    return MakeEmulatedCudaBackend(0, true, true);
  }();
  EXPECT_TRUE(made.ok()) << made.status();
  if (!made.ok()) return {};
  Backend& be = **made;
  const int n = 512, in = 1024, out = 2048;  // 2^30 multiply-adds: tuned, when asked
  Rng rng(11);
  const auto x = cpu_test::UniformVec(rng, static_cast<size_t>(n) * in, -0.5, 0.5);
  const auto w = cpu_test::UniformVec(rng, static_cast<size_t>(out) * in, -0.5, 0.5);
  const auto bias = cpu_test::UniformVec(rng, out, -0.5, 0.5);
  const auto resid = cpu_test::UniformVec(rng, static_cast<size_t>(n) * out, -0.5, 0.5);
  const auto dout = cpu_test::UniformVec(rng, static_cast<size_t>(n) * out, -0.5, 0.5);
  const auto dw0 = cpu_test::UniformVec(rng, w.size(), -0.5, 0.5);
  const auto db0 = cpu_test::UniformVec(rng, bias.size(), -0.5, 0.5);
  std::vector<void*> owned;
  auto put = [&](const std::vector<float>& host) {
    auto* d = static_cast<float*>(be.Alloc(host.size() * sizeof(float)));
    be.CopyFromHost(d, host.data(), host.size() * sizeof(float));
    owned.push_back(d);
    return d;
  };
  // The activations and the output gradient as the model holds them: bf16 operands.
  auto put_bf16 = [&](const std::vector<float>& host) {
    std::vector<uint16_t> bits(host.size());
    for (size_t i = 0; i < host.size(); ++i) bits[i] = FloatToBf16(host[i]).bits;
    void* d = be.Alloc(bits.size() * sizeof(uint16_t));
    be.CopyFromHost(d, bits.data(), bits.size() * sizeof(uint16_t));
    owned.push_back(d);
    return ConstOperand(d, DType::kBF16);
  };
  const ConstOperand dx = put_bf16(x), ddout = put_bf16(dout);
  float *dwt = put(w), *db = put(bias), *dres = put(resid);
  float *y1 = put(resid), *y2 = put(resid), *y3 = put(resid);
  float *gx = put(x), *gw = put(dw0), *gb = put(db0);
  be.Linear(y1, dx, dwt, db, n, in, out, false);
  be.Linear(y2, dx, dwt, nullptr, n, in, out, false);
  be.LinearResidual(y3, dres, dx, dwt, nullptr, n, in, out);
  be.LinearBackward(gx, gw, gb, ddout, dx, dwt, n, in, out, false);
  std::vector<std::vector<float>> results;
  for (auto [p, count] :
       {std::pair{y1, resid.size()}, std::pair{y2, resid.size()}, std::pair{y3, resid.size()},
        std::pair{gx, x.size()}, std::pair{gw, w.size()}, std::pair{gb, bias.size()}}) {
    results.emplace_back(count);
    be.CopyToHost(results.back().data(), p, count * sizeof(float));
  }
  for (void* p : owned) be.Free(p);
  return results;
}

TEST(EmulatedGemmTuning, TimingRunsLeaveTheResultsAsUntuned) {
  const auto plain = RunGemms(false), tuned = RunGemms(true);
  ASSERT_EQ(plain.size(), 6u);
  ASSERT_EQ(tuned.size(), 6u);
  const char* names[] = {"Linear with bias",  "Linear",
                         "LinearResidual",    "LinearBackward dx",
                         "LinearBackward dw", "LinearBackward dbias"};
  for (size_t i = 0; i < plain.size(); ++i) {
    ASSERT_EQ(plain[i].size(), tuned[i].size()) << names[i];
    EXPECT_EQ(std::memcmp(plain[i].data(), tuned[i].data(), plain[i].size() * sizeof(float)), 0)
        << names[i];
  }
}

}  // namespace
}  // namespace eellm
