// Accumulate-vs-write semantics of the CpuBackend backward ops (gradients documented "+=" must
// add, "written" ones must overwrite), and determinism: the parallel reductions give bitwise
// identical results with one thread and with several.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"

namespace eellm::cpu_test {
namespace {

using CpuAccumulateTest = CpuBackendTest;

// Expects got == 2 * once (up to rounding) and that `once` is not all zeros.
void ExpectDoubled(const char* what, const std::vector<float>& once,
                   const std::vector<float>& got) {
  ASSERT_GT(MaxAbs(once), 1e-3) << what;
  std::vector<float> twice(once.size());
  for (size_t i = 0; i < once.size(); ++i) twice[i] = 2.0f * once[i];
  EXPECT_LT(MaxAbsDiff(got, twice), 1e-5 * (1.0 + MaxAbs(twice))) << what;
}

TEST_F(CpuAccumulateTest, LinearBackward) {
  const int n = 4, in = 6, out = 5;
  auto x = RandVec(rng_, n * in), w = RandVec(rng_, out * in), dy = RandVec(rng_, n * out);
  std::vector<float> dx1(n * in, 0.0f), dw1(out * in, 0.0f), db1(out, 0.0f);
  be_.LinearBackward(dx1.data(), dw1.data(), db1.data(), dy.data(), x.data(), w.data(), n, in, out,
                     false);
  std::vector<float> dx(n * in, 0.0f), dw(out * in, 0.0f), db(out, 0.0f);
  for (int rep = 0; rep < 2; ++rep)
    be_.LinearBackward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), n, in, out,
                       /*accumulate_din=*/true);
  ExpectDoubled("Linear din (accumulate_din)", dx1, dx);
  ExpectDoubled("Linear dw", dw1, dw);
  ExpectDoubled("Linear dbias", db1, db);
  // accumulate_din = false writes din, whatever it held.
  std::vector<float> dx_w(n * in, 99.0f);
  be_.LinearBackward(dx_w.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), n, in, out,
                     false);
  EXPECT_EQ(dx_w, dx1);
}

TEST_F(CpuAccumulateTest, NormBackwards) {
  const int n = 3, c = 10;
  auto x = RandVec(rng_, n * c), g = RandVec(rng_, c), b = RandVec(rng_, c);
  auto dy = RandVec(rng_, n * c);
  std::vector<float> y(n * c), mean(n), rstd(n);
  be_.LayerNormForward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), n, c,
                       1e-5f);
  // dres = null writes dx (whatever it held); dres = dx accumulates; a separate dres is added.
  std::vector<float> dx1(n * c, 99.0f), dg1(c, 0.0f), db1(c, 0.0f);
  be_.LayerNormBackward(dx1.data(), nullptr, dg1.data(), db1.data(), dy.data(), x.data(), g.data(),
                        mean.data(), rstd.data(), n, c);
  std::vector<float> dx(n * c, 0.0f), dg(c, 0.0f), db(c, 0.0f);
  for (int rep = 0; rep < 2; ++rep)
    be_.LayerNormBackward(dx.data(), dx.data(), dg.data(), db.data(), dy.data(), x.data(), g.data(),
                          mean.data(), rstd.data(), n, c);
  ExpectDoubled("LayerNorm dx", dx1, dx);
  ExpectDoubled("LayerNorm dg", dg1, dg);
  ExpectDoubled("LayerNorm db", db1, db);
  std::vector<float> sum(n * c, 99.0f), unused(c, 0.0f);
  be_.LayerNormBackward(sum.data(), dx1.data(), unused.data(), nullptr, dy.data(), x.data(),
                        g.data(), mean.data(), rstd.data(), n, c);
  EXPECT_EQ(sum, dx) << "LayerNorm dx = dres + d/dx";

  be_.RmsNormForward(y.data(), rstd.data(), x.data(), g.data(), n, c, 1e-5f);
  std::vector<float> rdx1(n * c, 99.0f), rdg1(c, 0.0f), rdx(n * c, 0.0f), rdg(c, 0.0f);
  be_.RmsNormBackward(rdx1.data(), nullptr, rdg1.data(), dy.data(), x.data(), g.data(), rstd.data(),
                      n, c);
  for (int rep = 0; rep < 2; ++rep)
    be_.RmsNormBackward(rdx.data(), rdx.data(), rdg.data(), dy.data(), x.data(), g.data(),
                        rstd.data(), n, c);
  ExpectDoubled("RmsNorm dx", rdx1, rdx);
  ExpectDoubled("RmsNorm dg", rdg1, rdg);
  std::vector<float> rsum(n * c, 99.0f);
  be_.RmsNormBackward(rsum.data(), rdx1.data(), unused.data(), dy.data(), x.data(), g.data(),
                      rstd.data(), n, c);
  EXPECT_EQ(rsum, rdx) << "RmsNorm dx = dres + d/dx";
}

TEST_F(CpuAccumulateTest, EmbeddingBackward) {
  const int vocab = 5, c = 3;
  const std::vector<int32_t> ids = {2, 2, 4, 0};
  auto dy = RandVec(rng_, ids.size() * c);
  std::vector<float> d1(vocab * c, 0.0f), d2(vocab * c, 0.0f);
  be_.EmbeddingBackward(d1.data(), ids.data(), dy.data(), 4, c);
  for (int rep = 0; rep < 2; ++rep) be_.EmbeddingBackward(d2.data(), ids.data(), dy.data(), 4, c);
  ExpectDoubled("Embedding dtable", d1, d2);
}

TEST_F(CpuAccumulateTest, WrittenOutputsOverwrite) {
  const size_t n = 16;
  auto x = RandVec(rng_, n), up = RandVec(rng_, n), dy = RandVec(rng_, n);
  std::vector<float> a(n, 0.0f), b(n, 77.0f);
  be_.GeluBackward(a.data(), dy.data(), x.data(), n);
  be_.GeluBackward(b.data(), dy.data(), x.data(), n);
  EXPECT_EQ(a, b);
  std::vector<float> inplace = dy;  // dx may alias dout
  be_.GeluBackward(inplace.data(), inplace.data(), x.data(), n);
  EXPECT_EQ(inplace, a);
  std::vector<float> g1(n, 0.0f), u1(n, 0.0f), g2(n, -5.0f), u2(n, 5.0f);
  be_.SwiGluBackward(g1.data(), u1.data(), dy.data(), x.data(), up.data(), 2, n / 2, n / 2);
  be_.SwiGluBackward(g2.data(), u2.data(), dy.data(), x.data(), up.data(), 2, n / 2, n / 2);
  EXPECT_EQ(g1, g2);
  EXPECT_EQ(u1, u2);

  // Attention dq, dk, dv are written.
  const int bb = 1, t = 4, hq = 4, hkv = 2, d = 4;
  auto q = RandVec(rng_, bb * t * hq * d), k = RandVec(rng_, bb * t * hkv * d);
  auto v = RandVec(rng_, bb * t * hkv * d), dout = RandVec(rng_, q.size());
  std::vector<float> out(q.size()), lse(bb * hq * t);
  be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), bb, t, t, t, hq, hkv,
                       d, 0, hq * d, hkv * d);
  std::vector<float> dq1(q.size(), 0.0f), dk1(k.size(), 0.0f), dv1(v.size(), 0.0f);
  std::vector<float> dq2(q.size(), 3.0f), dk2(k.size(), 3.0f), dv2(v.size(), 3.0f);
  be_.AttentionBackward(dq1.data(), dk1.data(), dv1.data(), dout.data(), out.data(), lse.data(),
                        q.data(), k.data(), v.data(), bb, t, hq, hkv, d, hq * d, hkv * d);
  be_.AttentionBackward(dq2.data(), dk2.data(), dv2.data(), dout.data(), out.data(), lse.data(),
                        q.data(), k.data(), v.data(), bb, t, hq, hkv, d, hq * d, hkv * d);
  EXPECT_EQ(dq1, dq2);
  EXPECT_EQ(dk1, dk2);
  EXPECT_EQ(dv1, dv2);
}

// Runs fn() with 1 thread and with the default thread count; results must match bitwise.
template <typename Fn>
void ExpectThreadCountInvariant(const char* what, Fn fn) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> serial = fn();
  omp_set_num_threads(std::max(threads, 2));
  const std::vector<float> parallel = fn();
  omp_set_num_threads(threads);
  EXPECT_EQ(serial, parallel) << what;
}

TEST_F(CpuAccumulateTest, ReductionsAreDeterministic) {
  const int n = 512, c = 300, vocab = 50;
  auto x = RandVec(rng_, n * c), g = RandVec(rng_, c), dy = RandVec(rng_, n * c);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng_.Below(vocab));
  ExpectThreadCountInvariant("Embedding dtable", [&] {
    std::vector<float> dt(vocab * c, 0.0f);
    be_.EmbeddingBackward(dt.data(), ids.data(), dy.data(), n, c);
    return dt;
  });
  ExpectThreadCountInvariant("LayerNorm dx/dg/db", [&] {
    std::vector<float> y(n * c), mean(n), rstd(n), grads((n + 2) * c, 0.0f);
    be_.LayerNormForward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), nullptr, n, c,
                         1e-5f);
    be_.LayerNormBackward(grads.data(), grads.data(), grads.data() + n * c,
                          grads.data() + (n + 1) * c, dy.data(), x.data(), g.data(), mean.data(),
                          rstd.data(), n, c);
    return grads;
  });
  ExpectThreadCountInvariant("Linear dbias", [&] {
    std::vector<float> db(c, 0.0f);
    be_.LinearBackward(nullptr, nullptr, db.data(), dy.data(), x.data(), nullptr, n, c, c, false);
    return db;
  });
  ExpectThreadCountInvariant("SumSquares", [&] {
    return std::vector<float>{static_cast<float>(be_.SumSquares(x.data(), x.size()))};
  });
  const int b = 2, t = 64, hq = 4, hkv = 2, d = 16;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d), dout = RandVec(rng_, q.size());
  ExpectThreadCountInvariant("Attention", [&] {
    std::vector<float> out(q.size()), lse(b * hq * t);
    be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv,
                         d, 0, hq * d, hkv * d);
    std::vector<float> grads(q.size() + 2 * k.size());
    be_.AttentionBackward(grads.data(), grads.data() + q.size(), grads.data() + q.size() + k.size(),
                          dout.data(), out.data(), lse.data(), q.data(), k.data(), v.data(), b, t,
                          hq, hkv, d, hq * d, hkv * d);
    grads.insert(grads.end(), out.begin(), out.end());
    return grads;
  });
}

}  // namespace
}  // namespace eellm::cpu_test
