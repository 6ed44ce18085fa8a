// cuda-bf16w's bf16 copies of the registered weights: which fp32 ranges a refresh converts
// (StaleRanges), checked through Linear under the CPU emulation of CUDA. A refresh converts the
// ranges the backend's own ops wrote (and the gaps between close ones), not the whole arena, and
// WeightsChanged converts the range it names.
#include <vector>

#include "engine/cuda/stale_ranges.h"
#include "gtest/gtest.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"

namespace eellm {
namespace {

using Ranges = std::vector<cuda::StaleRanges::Range>;

TEST(StaleRanges, MergesRangesWithinTheGapAndKeepsOthersApart) {
  cuda::StaleRanges s(1000, 10);
  EXPECT_EQ(s.ranges(), (Ranges{{0, 1000}}));  // a new copy: all stale
  s.Clear();
  EXPECT_TRUE(s.empty());
  s.Mark(500, 510);
  s.Mark(100, 110);
  s.Mark(990, 2000);  // clipped to the array
  s.Mark(7, 7);       // empty: nothing
  EXPECT_EQ(s.ranges(), (Ranges{{100, 110}, {500, 510}, {990, 1000}}));
  s.Mark(120, 130);  // 10 after 110: merged
  s.Mark(480, 489);  // 11 before 500: apart
  EXPECT_EQ(s.ranges(), (Ranges{{100, 130}, {480, 489}, {500, 510}, {990, 1000}}));
  s.Mark(485, 995);  // bridges three
  EXPECT_EQ(s.ranges(), (Ranges{{100, 130}, {480, 1000}}));
  s.MarkAll();
  EXPECT_EQ(s.ranges(), (Ranges{{0, 1000}}));
}

// out = in @ w^T for one row of 8 ones: the sum of the bf16 copy of w[0, 8) (values exact in
// bf16, so the sums are exact).
float RowSum(Backend* be, float* in, float* out, const float* w) {
  be->Linear(out, in, w, nullptr, 1, 8, 1, false);
  float host = 0;
  be->CopyToHost(&host, out, sizeof(float));
  return host;
}

TEST(EmulatedWeightCopy, RefreshesWhatTheBackendWroteNotTheWholeArena) {
  auto made = MakeEmulatedCudaBackend(0, true, true);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend* be = made->get();
  const size_t n = size_t{3} << 20, far = size_t{5} << 19;  // far: 2.5M, beyond the merge gap
  auto* arena = static_cast<float*>(be->Alloc(n * sizeof(float)));
  auto* in = static_cast<float*>(be->Alloc(8 * sizeof(float)));
  auto* out = static_cast<float*>(be->Alloc(sizeof(float)));
  be->Fill(arena, n, 1.0f);
  be->Fill(in, 8, 1.0f);
  be->RegisterWeights(arena, n);
  EXPECT_EQ(RowSum(be, in, out, arena), 8.0f);
  EXPECT_EQ(RowSum(be, in, out, arena + far), 8.0f);

  // The backend's write at `far` is converted; a write it cannot see (the emulated device's
  // memory is host memory) at the start of the arena is not: the refresh left that range alone.
  be->Fill(arena + far, 8, 2.0f);
  for (int i = 0; i < 8; ++i) arena[i] = 3.0f;
  EXPECT_EQ(RowSum(be, in, out, arena + far), 16.0f);
  EXPECT_EQ(RowSum(be, in, out, arena), 8.0f);

  // Two writes less than the gap apart: the range between them is converted too.
  for (int i = 0; i < 8; ++i) arena[64 + i] = 5.0f;
  be->Fill(arena + 32, 8, 4.0f);
  be->Fill(arena + 128, 8, 4.0f);
  EXPECT_EQ(RowSum(be, in, out, arena + 32), 32.0f);
  EXPECT_EQ(RowSum(be, in, out, arena + 64), 40.0f);
  EXPECT_EQ(RowSum(be, in, out, arena), 8.0f);

  // An optimizer step over one run marks that run.
  std::vector<float> g(8, 1.0f), zeros(8, 0.0f);
  auto* grad = static_cast<float*>(be->Alloc(n * sizeof(float)));
  auto* m = static_cast<float*>(be->Alloc(n * sizeof(float)));
  auto* v = static_cast<float*>(be->Alloc(n * sizeof(float)));
  be->CopyFromHost(grad + far, g.data(), 8 * sizeof(float));
  be->CopyFromHost(m + far, zeros.data(), 8 * sizeof(float));
  be->CopyFromHost(v + far, zeros.data(), 8 * sizeof(float));
  be->AdamWRuns(arena, grad, m, v, {{far, 8, false}}, 1.0f, 0.9f, 0.999f, 0.0f, 0.0f, 1);
  EXPECT_EQ(RowSum(be, in, out, arena + far), 8.0f);  // 2 - lr * sign(g): 1 each
  EXPECT_EQ(RowSum(be, in, out, arena), 8.0f);

  // WeightsChanged: the range announced (a communicator's write).
  be->WeightsChanged(arena + 8, n - 8);
  EXPECT_EQ(RowSum(be, in, out, arena), 8.0f);
  be->WeightsChanged(arena, n);
  EXPECT_EQ(RowSum(be, in, out, arena), 24.0f);

  be->UnregisterWeights(arena);
  for (void* p : {static_cast<void*>(arena), static_cast<void*>(in), static_cast<void*>(out),
                  static_cast<void*>(grad), static_cast<void*>(m), static_cast<void*>(v)}) {
    be->Free(p);
  }
}

}  // namespace
}  // namespace eellm
