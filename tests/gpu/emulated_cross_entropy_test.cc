// The staged cross-entropy kernel of engine/cuda/softmax_kernels.cu under the CPU emulation, with
// few blocks so that each takes several rows: the next row's copies start into the chunks the
// gradient pass is done with, and the max pass takes each chunk as it lands (copies land at the
// wait that covers them, the latest the device allows). Every row's results must be the bits of
// the same row run alone in its block, and the CPU's within the reduction tolerance.
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/make_cuda_backend.h"  // (as MakeEmulatedCudaBackend)
// clang-format on

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

struct CeResult {
  std::vector<float> losses, max_prob, dlogits;
};

TEST(EmulatedCrossEntropy, RowsPipelinedThroughFewBlocksMatchRowsAlone) {
  auto made = MakeEmulatedCudaBackend(0, false);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend& be = **made;
  const int n = 37, v = 1000;  // staged: 250 copies of 16 bytes a row, 256 threads, 4 chunks
  const size_t nv = static_cast<size_t>(n) * v;
  Rng rng(5);
  std::vector<float> logits(nv), weights(n);
  std::vector<int32_t> targets(n);
  for (float& x : logits) x = 3.0f * (2.0f * static_cast<float>(rng.Uniform()) - 1.0f);
  for (int r = 0; r < n; ++r) {
    targets[r] = static_cast<int32_t>(rng.Below(v));
    weights[r] = 0.5f + static_cast<float>(rng.Uniform());
  }
  targets[3] = v - 1;    // the last column of the last chunk
  targets[n - 1] = 0;    // the first column of a chunk ...
  targets[n - 2] = 252;  // ... and of the second chunk
  auto put = [&](const void* host, size_t bytes) {
    void* d = be.Alloc(bytes);
    be.CopyFromHost(d, host, bytes);
    return d;
  };
  auto* d_targets = static_cast<int32_t*>(put(targets.data(), n * sizeof(int32_t)));
  auto* d_weights = static_cast<float*>(put(weights.data(), n * sizeof(float)));
  // sms: how many SMs the launch assumes (8 blocks an SM at 256 threads); aliased: the gradient
  // overwrites the logits.
  auto run = [&](int sms, bool aliased) {
    auto* d_logits = static_cast<float*>(put(logits.data(), nv * sizeof(float)));
    auto* d_losses = static_cast<float*>(be.Alloc(n * sizeof(float)));
    auto* d_max = static_cast<float*>(be.Alloc(n * sizeof(float)));
    float* d_dl = aliased ? d_logits : static_cast<float*>(be.Alloc(nv * sizeof(float)));
    EXPECT_EQ(cuda::CrossEntropy(d_losses, d_max, cuda::Elems{d_dl, false}, d_logits, d_targets,
                                 d_weights, n, v, sms, nullptr),
              cudaSuccess);
    CeResult r{std::vector<float>(n), std::vector<float>(n), std::vector<float>(nv)};
    be.CopyToHost(r.losses.data(), d_losses, n * sizeof(float));
    be.CopyToHost(r.max_prob.data(), d_max, n * sizeof(float));
    be.CopyToHost(r.dlogits.data(), d_dl, nv * sizeof(float));
    for (void* p :
         {static_cast<void*>(d_logits), static_cast<void*>(d_losses), static_cast<void*>(d_max)}) {
      be.Free(p);
    }
    if (!aliased) be.Free(d_dl);
    return r;
  };
  const CeResult alone = run(132, false);  // 37 blocks: a row each
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  for (const auto& [sms, aliased] :
       {std::pair{1, false}, std::pair{2, false}, std::pair{1, true}}) {
    SCOPED_TRACE(::testing::Message() << "sms " << sms << (aliased ? ", in place" : ""));
    const CeResult r = run(sms, aliased);  // 8 or 16 blocks: 2 to 5 rows each
    EXPECT_TRUE(same_bits(r.losses, alone.losses));
    EXPECT_TRUE(same_bits(r.max_prob, alone.max_prob));
    EXPECT_TRUE(same_bits(r.dlogits, alone.dlogits));
  }
  // And the CPU's values.
  CpuBackend cpu;
  std::vector<float> losses(n), max_prob(n), dlogits(nv);
  cpu.CrossEntropy(losses.data(), max_prob.data(), dlogits.data(), logits.data(), targets.data(),
                   weights.data(), n, v);
  for (int row = 0; row < n; ++row) {
    EXPECT_NEAR(alone.losses[row], losses[row], 1e-5 * std::fabs(losses[row]) + 1e-6) << row;
    EXPECT_NEAR(alone.max_prob[row], max_prob[row], 1e-6) << row;
  }
  for (size_t i = 0; i < nv; ++i) {
    ASSERT_NEAR(alone.dlogits[i], dlogits[i], 1e-5 * std::fabs(dlogits[i]) + 1e-7) << i;
  }
  be.Free(d_targets);
  be.Free(d_weights);
}

}  // namespace
}  // namespace eellm
