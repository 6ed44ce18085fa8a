// The ProfilingBackend's accounting of each op's work (what `eellm bench train` divides by the
// op's time): the FLOPs of matrix products and the least memory traffic, on the CPU backend.
#include "engine/profiling_backend.h"

#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

class ProfilingWork : public ::testing::Test {
 protected:
  ProfilingWork() { prof_.set_timing(true); }
  const ProfilingBackend::OpStats &Stats(const char *op) { return prof_.stats().at(op); }
  float *Zeros(size_t n) {
    bufs_.emplace_back(n, 0.0f);
    return bufs_.back().data();
  }
  CpuBackend cpu_;
  ProfilingBackend prof_{&cpu_};
  std::vector<std::vector<float>> bufs_;
};

TEST_F(ProfilingWork, LinearCountsProductsAndTraffic) {
  const int n = 4, in = 3, out = 5;
  float *x = Zeros(n * in), *w = Zeros(out * in), *b = Zeros(out), *y = Zeros(n * out);
  prof_.Linear(y, x, w, b, n, in, out, /*accumulate=*/false);
  EXPECT_EQ(Stats("Linear").calls, 1);
  EXPECT_EQ(Stats("Linear").flops, 2.0 * n * in * out);
  // in, w, out (written once), bias; all fp32.
  EXPECT_EQ(Stats("Linear").bytes, 4.0 * (n * in + out * in + n * out + out));
  prof_.Linear(y, x, w, nullptr, n, in, out, /*accumulate=*/true);  // out read and written
  EXPECT_EQ(Stats("Linear").bytes,
            4.0 * (n * in + out * in + n * out + out) + 4.0 * (n * in + out * in + 2 * n * out));
  float *dx = Zeros(n * in), *dw = Zeros(out * in);
  prof_.LinearBackward(dx, dw, nullptr, y, x, w, n, in, out, false);
  EXPECT_EQ(Stats("LinearBackward").flops, 2 * 2.0 * n * in * out);
  // dout; w and din; in and dw (read and written).
  EXPECT_EQ(Stats("LinearBackward").bytes,
            4.0 * (n * out + out * in + n * in + n * in + 2 * out * in));
  // The same calls by shape, each its own key, summing to the op's totals.
  const auto &shapes = prof_.gemm_shapes();
  ASSERT_EQ(shapes.size(), 3u);
  EXPECT_EQ(shapes.at("Linear 4 x 5 <- 3, f32 out, bias").calls, 1);
  EXPECT_EQ(shapes.at("Linear 4 x 5 <- 3, f32 out, added to out").flops, 2.0 * n * in * out);
  EXPECT_EQ(shapes.at("LinearBackward 4 x 5 <- 3, f32 dX and dW").bytes,
            Stats("LinearBackward").bytes);
  // Untimed calls are not counted, by op or by shape.
  prof_.set_timing(false);
  prof_.Linear(y, x, w, b, n, in, out, /*accumulate=*/false);
  EXPECT_EQ(shapes.at("Linear 4 x 5 <- 3, f32 out, bias").calls, 1);
  EXPECT_EQ(Stats("Linear").calls, 2);
}

TEST_F(ProfilingWork, AttentionCountsTheCausalPairs) {
  const int b = 2, hq = 4, hkv = 2, d = 8;
  {  // Training: t = 5, pairs 1 + 2 + ... + 5 = 15 per head.
    const int t = 5;
    float *q = Zeros(b * t * hq * d), *k = Zeros(b * t * hkv * d), *v = Zeros(b * t * hkv * d);
    float *o = Zeros(b * t * hq * d), *lse = Zeros(b * hq * t);
    prof_.AttentionForward(o, lse, q, k, v, b, t, t, t, hq, hkv, d, 0, hq * d, hkv * d);
    EXPECT_EQ(Stats("AttentionForward").flops, 4.0 * d * b * hq * 15);
    EXPECT_EQ(Stats("AttentionForward").bytes,
              4.0 * (2 * b * t * hq * d + 2 * b * t * hkv * d + b * hq * t));
    float *dq = Zeros(b * t * hq * d), *dk = Zeros(b * t * hkv * d), *dv = Zeros(b * t * hkv * d);
    prof_.AttentionBackward(dq, dk, dv, o, o, lse, q, k, v, b, t, hq, hkv, d, hq * d, hkv * d);
    EXPECT_EQ(Stats("AttentionBackward").flops, 2.5 * 4.0 * d * b * hq * 15);
  }
  {  // Decoding one token after 6 cached ones: 7 keys per head.
    const int cap = 8;
    float *q = Zeros(hq * d), *k = Zeros(cap * hkv * d), *v = Zeros(cap * hkv * d);
    float *o = Zeros(hq * d);
    prof_.ResetStats();
    prof_.AttentionForward(o, nullptr, q, k, v, 1, 1, 7, cap, hq, hkv, d, 6, hq * d, hkv * d);
    EXPECT_EQ(Stats("AttentionForward").flops, 4.0 * d * hq * 7);
  }
}

TEST_F(ProfilingWork, ElementwiseOpsCountTheirOperandsOnce) {
  const size_t n = 64;
  float *g = Zeros(n), *u = Zeros(n), *dy = Zeros(n), *dg = Zeros(n), *du = Zeros(n);
  prof_.SwiGluBackward(dg, du, dy, g, u, 8, n / 8, n / 8);
  EXPECT_EQ(Stats("SwiGluBackward").flops, 0);
  EXPECT_EQ(Stats("SwiGluBackward").bytes, 4.0 * 5 * n);
  float *p = Zeros(n), *m = Zeros(n), *v = Zeros(n);
  prof_.AdamW(p, g, m, v, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1);
  EXPECT_EQ(Stats("AdamW").bytes, 4.0 * 7 * n);  // p, m, v read and written; g read
}

}  // namespace
}  // namespace eellm
