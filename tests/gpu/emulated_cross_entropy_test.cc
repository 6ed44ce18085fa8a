// The staged cross-entropy kernel of engine/cuda/softmax_kernels.cu under the CPU emulation, with
// few blocks so that each takes several rows: the next row's copies start into the chunks the
// gradient pass is done with, and the max pass takes each chunk as it lands (copies land at the
// wait that covers them, the latest the device allows). Every row's results must be the bits of
// the same row run alone in its block, and the CPU's within the reduction tolerance. Logits (and
// their gradients, in place or not) in fp32 and in bf16, as the training heads keep them with
// bf16 operands.
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/make_cuda_backend.h"  // (as MakeEmulatedCudaBackend)
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/core/dtype.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

struct CeResult {
  std::vector<float> losses, max_prob, dlogits;
};

// n rows of v logits (fp32, or bf16 with bf16 gradients), through as many blocks as 1 and 2 SMs
// hold (the emulation's occupancy: 2,048 threads an SM, at most 32 blocks), against 132 SMs' (a
// block a row) and the CPU.
void CheckPipelinedRows(int n, int v, bool half) {
  SCOPED_TRACE(::testing::Message() << n << " rows of " << v << (half ? " bf16" : " fp32"));
  auto made = MakeEmulatedCudaBackend(0, false);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend& be = **made;
  const size_t nv = static_cast<size_t>(n) * v, elem = half ? 2 : 4;
  Rng rng(5);
  std::vector<float> logits(nv), weights(n);
  std::vector<int32_t> targets(n);
  for (float& x : logits) x = 3.0f * (2.0f * static_cast<float>(rng.Uniform()) - 1.0f);
  std::vector<uint16_t> logits16(nv);
  if (half) {  // the values the device holds
    for (size_t i = 0; i < nv; ++i) {
      logits16[i] = FloatToBf16(logits[i]).bits;
      logits[i] = Bf16ToFloat(bf16{logits16[i]});
    }
  }
  for (int r = 0; r < n; ++r) {
    targets[r] = static_cast<int32_t>(rng.Below(v));
    weights[r] = 0.5f + static_cast<float>(rng.Uniform());
  }
  targets[3] = v - 1;                                     // the last column of the last chunk
  targets[n - 1] = 0;                                     // the first column of a chunk ...
  targets[n - 2] = std::min(v - 1, (v / 4 + 3) / 4 * 4);  // ... and of the second chunk
  targets[n - 3] = std::min(v - 1, (v / 8 + 3) / 4 * 8);  // (of bf16 rows)
  auto put = [&](const void* host, size_t bytes) {
    void* d = be.Alloc(bytes);
    be.CopyFromHost(d, host, bytes);
    return d;
  };
  auto* d_targets = static_cast<int32_t*>(put(targets.data(), n * sizeof(int32_t)));
  auto* d_weights = static_cast<float*>(put(weights.data(), n * sizeof(float)));
  // sms: how many SMs the launch assumes; aliased: the gradient overwrites the logits; unstaged:
  // the logits one element past a 16-byte boundary, which the staged kernel cannot copy (the
  // kernel of a row a block, read from global memory, takes them).
  bool by_confidence = false;  // the rows' gradients weighted by their max probability too
  auto run = [&](int sms, bool aliased, bool unstaged = false) {
    auto* base = static_cast<char*>(be.Alloc((nv + 1) * elem));
    char* d_logits = base + (unstaged ? elem : 0);
    be.CopyFromHost(d_logits, half ? static_cast<const void*>(logits16.data()) : logits.data(),
                    nv * elem);
    auto* d_losses = static_cast<float*>(be.Alloc(n * sizeof(float)));
    auto* d_max = static_cast<float*>(be.Alloc(n * sizeof(float)));
    char* d_dl = aliased ? d_logits : static_cast<char*>(be.Alloc(nv * elem));
    EXPECT_EQ(
        cuda::CrossEntropy(d_losses, d_max, cuda::Elems{d_dl, half}, cuda::Elems{d_logits, half},
                           d_targets, d_weights, by_confidence, n, v, sms, nullptr),
        cudaSuccess);
    CeResult r{std::vector<float>(n), std::vector<float>(n), std::vector<float>(nv)};
    be.CopyToHost(r.losses.data(), d_losses, n * sizeof(float));
    be.CopyToHost(r.max_prob.data(), d_max, n * sizeof(float));
    if (half) {
      std::vector<uint16_t> g(nv);
      be.CopyToHost(g.data(), d_dl, nv * elem);
      for (size_t i = 0; i < nv; ++i) r.dlogits[i] = Bf16ToFloat(bf16{g[i]});
    } else {
      be.CopyToHost(r.dlogits.data(), d_dl, nv * elem);
    }
    for (void* p :
         {static_cast<void*>(base), static_cast<void*>(d_losses), static_cast<void*>(d_max)}) {
      be.Free(p);
    }
    if (!aliased) be.Free(d_dl);
    return r;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  for (bool confidence : {false, true}) {
    by_confidence = confidence;
    SCOPED_TRACE(confidence ? "weighted by confidence" : "weights alone");
    const CeResult alone = run(132, false);  // a block a row
    {  // Staged or read from global memory: the same passes, the same bits.
      const CeResult unstaged = run(132, false, /*unstaged=*/true);
      EXPECT_TRUE(same_bits(unstaged.losses, alone.losses));
      EXPECT_TRUE(same_bits(unstaged.max_prob, alone.max_prob));
      EXPECT_TRUE(same_bits(unstaged.dlogits, alone.dlogits));
    }
    for (const auto& [sms, aliased] :
         {std::pair{1, false}, std::pair{2, false}, std::pair{1, true}}) {
      SCOPED_TRACE(::testing::Message() << "sms " << sms << (aliased ? ", in place" : ""));
      const CeResult r = run(sms, aliased);  // several rows a block
      EXPECT_TRUE(same_bits(r.losses, alone.losses));
      EXPECT_TRUE(same_bits(r.max_prob, alone.max_prob));
      EXPECT_TRUE(same_bits(r.dlogits, alone.dlogits));
    }
    // And the CPU's values (from the same logit values; a bf16 gradient rounded once more).
    const double rel = half ? 1.0 / 256 : 1e-5;
    CpuBackend cpu;
    std::vector<float> losses(n), max_prob(n), dlogits(nv);
    cpu.CrossEntropy(losses.data(), max_prob.data(), dlogits.data(), logits.data(), targets.data(),
                     weights.data(), by_confidence, n, v);
    for (int row = 0; row < n; ++row) {
      EXPECT_NEAR(alone.losses[row], losses[row], 1e-5 * std::fabs(losses[row]) + 1e-6) << row;
      EXPECT_NEAR(alone.max_prob[row], max_prob[row], 1e-6) << row;
    }
    for (size_t i = 0; i < nv; ++i) {
      ASSERT_NEAR(alone.dlogits[i], dlogits[i], rel * std::fabs(dlogits[i]) + 1e-7) << i;
    }
  }
  be.Free(d_targets);
  be.Free(d_weights);
}

TEST(EmulatedCrossEntropy, RowsPipelinedThroughFewBlocksMatchRowsAlone) {
  // 250 copies of 16 bytes a row, 256 threads (8 blocks an SM), 4 chunks of 252, 252, 252 and
  // 244 logits: 37 rows through 8 and 16 blocks.
  // In bf16: 125 copies a row, chunks of 256, 256, 256 and 232 logits.
  for (bool half : {false, true}) {
    CheckPipelinedRows(37, 1000, half);
    // 2 copies a row (1 in bf16), 32 threads (32 blocks an SM): chunks of 4, 4, 0 and 0 logits
    // (8, 0, 0 and 0 in bf16: empty groups and passes), 150 rows through 32 and 64 blocks.
    CheckPipelinedRows(150, 8, half);
    // Rows of 1,004: staged in fp32, not in bf16 (not whole 16-byte pieces).
    CheckPipelinedRows(9, 1004, half);
  }
}

}  // namespace
}  // namespace eellm
