// Finite-difference gradient checks for every CpuBackend op with a backward: the scalar
// L = sum(out * R) with a fixed random R is differentiated numerically (central differences
// in fp32) and compared with the analytic gradients, inputs and parameters alike.
// Tolerance: max|analytic - numeric| <= 2e-2 * max|analytic| unless stated.
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"

namespace eellm::cpu_test {
namespace {

using CpuGradTest = CpuBackendTest;

TEST_F(CpuGradTest, Linear) {
  const int n = 3, in = 5, out = 4;
  auto x = RandVec(rng_, n * in), w = RandVec(rng_, out * in), bias = RandVec(rng_, out);
  auto r = RandVec(rng_, n * out);
  std::vector<float> y(n * out);
  auto loss = [&] {
    be_.Linear(y.data(), x.data(), w.data(), bias.data(), n, in, out, false);
    return Dot(y, r);
  };
  std::vector<float> dx(n * in, 7.0f), dw(out * in, 0.0f), db(out, 0.0f);
  be_.LinearBackward(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), n, in, out,
                     /*accumulate_din=*/false);
  ExpectGradMatches("Linear din", &x, dx, loss);
  ExpectGradMatches("Linear dw", &w, dw, loss);
  ExpectGradMatches("Linear dbias", &bias, db, loss);
}

TEST_F(CpuGradTest, LayerNorm) {
  const int n = 3, c = 8;
  auto x = RandVec(rng_, n * c, 2.0), g = UniformVec(rng_, c, 0.5, 1.5), b = RandVec(rng_, c);
  auto r = RandVec(rng_, n * c);
  std::vector<float> y(n * c), mean(n), rstd(n);
  auto loss = [&] {
    be_.LayerNormForward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), n, c,
                         1e-5f);
    return Dot(y, r);
  };
  loss();
  std::vector<float> dx(n * c, 0.0f), dg(c, 0.0f), db(c, 0.0f);
  be_.LayerNormBackward(dx.data(), nullptr, dg.data(), db.data(), r.data(), x.data(), g.data(),
                        mean.data(), rstd.data(), n, c);
  ExpectGradMatches("LayerNorm dx", &x, dx, loss);
  ExpectGradMatches("LayerNorm dg", &g, dg, loss);
  ExpectGradMatches("LayerNorm db", &b, db, loss);
}

TEST_F(CpuGradTest, RmsNorm) {
  const int n = 3, c = 8;
  auto x = RandVec(rng_, n * c, 2.0), g = UniformVec(rng_, c, 0.5, 1.5);
  auto r = RandVec(rng_, n * c);
  std::vector<float> y(n * c), rstd(n);
  auto loss = [&] {
    be_.RmsNormForward(y.data(), rstd.data(), x.data(), g.data(), n, c, 1e-5f);
    return Dot(y, r);
  };
  loss();
  std::vector<float> dx(n * c, 0.0f), dg(c, 0.0f);
  be_.RmsNormBackward(dx.data(), nullptr, dg.data(), r.data(), x.data(), g.data(), rstd.data(), n,
                      c);
  ExpectGradMatches("RmsNorm dx", &x, dx, loss);
  ExpectGradMatches("RmsNorm dg", &g, dg, loss);
}

TEST_F(CpuGradTest, Gelu) {
  const size_t n = 40;
  auto x = RandVec(rng_, n, 2.0), r = RandVec(rng_, n);
  std::vector<float> y(n);
  auto loss = [&] {
    be_.GeluForward(y.data(), x.data(), n);
    return Dot(y, r);
  };
  std::vector<float> dx(n, 3.0f);
  be_.GeluBackward(dx.data(), r.data(), x.data(), n);
  ExpectGradMatches("Gelu dx", &x, dx, loss, 1e-3f);
}

TEST_F(CpuGradTest, SwiGlu) {
  const int n = 40;
  auto gate = RandVec(rng_, n, 2.0), up = RandVec(rng_, n), r = RandVec(rng_, n);
  std::vector<float> y(n);
  auto loss = [&] {
    be_.SwiGluForward(y.data(), gate.data(), up.data(), 1, n, n);
    return Dot(y, r);
  };
  std::vector<float> dgate(n, 3.0f), dup(n, 3.0f);
  be_.SwiGluBackward(dgate.data(), dup.data(), r.data(), gate.data(), up.data(), 1, n, n);
  ExpectGradMatches("SwiGlu dgate", &gate, dgate, loss, 1e-3f);
  ExpectGradMatches("SwiGlu dup", &up, dup, loss, 1e-3f);
}

TEST_F(CpuGradTest, Rope) {
  const int n = 3, heads = 2, hd = 8;
  const std::vector<int32_t> pos = {0, 5, 17};
  auto x = RandVec(rng_, n * heads * hd), r = RandVec(rng_, n * heads * hd);
  std::vector<float> y;
  auto loss = [&] {
    y = x;
    be_.RopeForward(y.data(), pos.data(), n, heads, hd, heads * hd, RopeParams{10000.0f});
    return Dot(y, r);
  };
  std::vector<float> dx = r;
  be_.RopeBackward(dx.data(), pos.data(), n, heads, hd, heads * hd, RopeParams{10000.0f});
  ExpectGradMatches("Rope dx", &x, dx, loss);
}

TEST_F(CpuGradTest, Embedding) {
  const int vocab = 6, c = 4;
  const std::vector<int32_t> ids = {1, 3, 1, 5, 0, 1};
  const int n = static_cast<int>(ids.size());
  auto table = RandVec(rng_, vocab * c), r = RandVec(rng_, n * c);
  std::vector<float> y(n * c);
  auto loss = [&] {
    be_.EmbeddingForward(y.data(), ids.data(), table.data(), n, c);
    return Dot(y, r);
  };
  std::vector<float> dtable(vocab * c, 0.0f);
  be_.EmbeddingBackward(dtable.data(), ids.data(), r.data(), n, c);
  ExpectGradMatches("Embedding dtable", &table, dtable, loss);
  for (int j = 0; j < c; ++j) EXPECT_EQ(dtable[2 * c + j], 0.0f) << "unused row 2";
}

struct AttnShape {
  int hq, hkv;
  friend std::ostream& operator<<(std::ostream& os, const AttnShape& s) {
    return os << "hq=" << s.hq << " hkv=" << s.hkv;
  }
};

class CpuAttentionGradTest : public CpuBackendTest,
                             public ::testing::WithParamInterface<AttnShape> {};

TEST_P(CpuAttentionGradTest, QKV) {
  const int b = 2, t = 5, d = 8, hq = GetParam().hq, hkv = GetParam().hkv;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d), r = RandVec(rng_, b * t * hq * d);
  std::vector<float> out(b * t * hq * d), lse(b * hq * t);
  auto loss = [&] {
    be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv,
                         d, 0, hq * d, hkv * d);
    return Dot(out, r);
  };
  loss();
  std::vector<float> dq(q.size(), 9.0f), dk(k.size(), 9.0f), dv(v.size(), 9.0f);
  be_.AttentionBackward(dq.data(), dk.data(), dv.data(), r.data(), out.data(), lse.data(), q.data(),
                        k.data(), v.data(), b, t, hq, hkv, d, hq * d, hkv * d);
  ExpectGradMatches("Attention dq", &q, dq, loss);
  ExpectGradMatches("Attention dk", &k, dk, loss);
  ExpectGradMatches("Attention dv", &v, dv, loss);
}

INSTANTIATE_TEST_SUITE_P(Heads, CpuAttentionGradTest,
                         ::testing::Values(AttnShape{4, 2}, AttnShape{4, 4}, AttnShape{4, 1}),
                         [](const ::testing::TestParamInfo<AttnShape>& p) {
                           return "hq" + std::to_string(p.param.hq) + "_hkv" +
                                  std::to_string(p.param.hkv);
                         });

TEST_F(CpuGradTest, CrossEntropyWeighted) {
  const int n = 4, v = 7;
  auto logits = RandVec(rng_, n * v, 2.0);
  const std::vector<int32_t> targets = {2, 0, 6, 3};
  const std::vector<float> weights = {0.5f, 0.0f, 2.0f, 1.3f};
  std::vector<float> losses(n);
  // L = sum_r weights[r] * losses[r]; its gradient is the documented dlogits.
  auto loss = [&] {
    be_.CrossEntropy(losses.data(), nullptr, nullptr, logits.data(), targets.data(), weights.data(),
                     false, n, v);
    return Dot(losses, weights);
  };
  std::vector<float> dlogits(n * v, 5.0f);
  be_.CrossEntropy(losses.data(), nullptr, dlogits.data(), logits.data(), targets.data(),
                   weights.data(), false, n, v);
  ExpectGradMatches("CrossEntropy dlogits", &logits, dlogits, loss, 1e-3f);
  for (int j = 0; j < v; ++j) EXPECT_EQ(dlogits[1 * v + j], 0.0f) << "zero-weight row";
  EXPECT_GT(losses[1], 0.0f) << "zero-weight rows still get their loss";

  // dlogits aliasing logits gives the same values (losses recomputed: the check clobbered them).
  loss();
  std::vector<float> inplace = logits, losses2(n);
  be_.CrossEntropy(losses2.data(), nullptr, inplace.data(), inplace.data(), targets.data(),
                   weights.data(), false, n, v);
  EXPECT_EQ(MaxAbsDiff(inplace, dlogits), 0.0);
  EXPECT_EQ(MaxAbsDiff(losses2, losses), 0.0);
}

}  // namespace
}  // namespace eellm::cpu_test
