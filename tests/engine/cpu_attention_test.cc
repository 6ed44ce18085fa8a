// Forward checks of CpuBackend causal GQA attention: against a naive double reference (with
// q_offset and tk_cap > tk), the saved log-sum-exps, GQA == MHA with repeated KV heads, and the
// KV-cache decode path reproducing the training path row by row.
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"

namespace eellm::cpu_test {
namespace {

using CpuAttentionTest = CpuBackendTest;

// Naive attention in double. q: [b, tq, hq, d]; k, v: [b, tk_cap, hkv, d]; returns
// out [b, tq, hq, d] and lse [b, hq, tq] (log-sum-exp of each query row's scaled scores).
void RefAttention(const std::vector<float>& q, const std::vector<float>& k,
                  const std::vector<float>& v, int b, int tq, int tk, int tk_cap, int hq, int hkv,
                  int d, int q_offset, std::vector<double>* out, std::vector<double>* lse) {
  out->assign(static_cast<size_t>(b) * tq * hq * d, 0.0);
  lse->assign(static_cast<size_t>(b) * hq * tq, 0.0);
  for (int bi = 0; bi < b; ++bi)
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < tq; ++i) {
        const int kvh = h / (hq / hkv);
        const int last = q_offset + i;
        std::vector<double> s(last + 1);
        double mx = -1e300;
        for (int j = 0; j <= last; ++j) {
          double dot = 0.0;
          for (int e = 0; e < d; ++e)
            dot += static_cast<double>(q[((bi * tq + i) * hq + h) * d + e]) *
                   k[((bi * tk_cap + j) * hkv + kvh) * d + e];
          s[j] = dot / std::sqrt(static_cast<double>(d));
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        (*lse)[(bi * hq + h) * tq + i] = mx + std::log(sum);
        for (int j = 0; j <= last; ++j) {
          const double p = s[j] / sum;
          for (int e = 0; e < d; ++e)
            (*out)[((bi * tq + i) * hq + h) * d + e] +=
                p * v[((bi * tk_cap + j) * hkv + kvh) * d + e];
        }
      }
}

TEST_F(CpuAttentionTest, TrainingPathMatchesReference) {
  const int b = 2, t = 6, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d);
  std::vector<float> out(q.size()), lse(b * hq * t, 42.0f);
  be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv, d,
                       0);
  std::vector<double> ref_out, ref_lse;
  RefAttention(q, k, v, b, t, t, t, hq, hkv, d, 0, &ref_out, &ref_lse);
  EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5);
  EXPECT_LT(MaxAbsDiff(lse, ref_lse), 1e-5);
  // The first query sees only itself: its log-sum-exp is its own scaled score.
  double s00 = 0.0;
  for (int e = 0; e < d; ++e) s00 += static_cast<double>(q[e]) * k[e];
  EXPECT_NEAR(lse[0], s00 / std::sqrt(static_cast<double>(d)), 1e-6);
}

TEST_F(CpuAttentionTest, OffsetAndCapacityMatchReference) {
  // Decode-style call: 3 queries after 4 cached tokens, in a cache of capacity 10 whose unused
  // tail holds garbage that must be ignored.
  const int b = 2, tq = 3, q_offset = 4, tk = 7, tk_cap = 10, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * tq * hq * d), k = RandVec(rng_, b * tk_cap * hkv * d);
  auto v = RandVec(rng_, b * tk_cap * hkv * d);
  for (int bi = 0; bi < b; ++bi)
    for (int j = tk; j < tk_cap; ++j)
      for (int e = 0; e < hkv * d; ++e) {
        k[(bi * tk_cap + j) * hkv * d + e] = 1e4f;
        v[(bi * tk_cap + j) * hkv * d + e] = NAN;
      }
  std::vector<float> out(q.size()), lse(b * hq * tq);
  be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, tq, tk, tk_cap, hq,
                       hkv, d, q_offset);
  std::vector<double> ref_out, ref_lse;
  RefAttention(q, k, v, b, tq, tk, tk_cap, hq, hkv, d, q_offset, &ref_out, &ref_lse);
  EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5);
  EXPECT_LT(MaxAbsDiff(lse, ref_lse), 1e-5);
}

TEST_F(CpuAttentionTest, GqaEqualsMhaWithRepeatedKvHeads) {
  const int b = 1, t = 5, hq = 4, hkv = 2, d = 4;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d);
  std::vector<float> k_rep(b * t * hq * d), v_rep(b * t * hq * d);
  for (int j = 0; j < t; ++j)
    for (int h = 0; h < hq; ++h)
      for (int e = 0; e < d; ++e) {
        k_rep[(j * hq + h) * d + e] = k[(j * hkv + h / 2) * d + e];
        v_rep[(j * hq + h) * d + e] = v[(j * hkv + h / 2) * d + e];
      }
  std::vector<float> out_gqa(q.size()), out_mha(q.size());
  be_.AttentionForward(out_gqa.data(), nullptr, q.data(), k.data(), v.data(), b, t, t, t, hq, hkv,
                       d, 0);
  be_.AttentionForward(out_mha.data(), nullptr, q.data(), k_rep.data(), v_rep.data(), b, t, t, t,
                       hq, hq, d, 0);
  EXPECT_EQ(MaxAbsDiff(out_gqa, out_mha), 0.0);
}

TEST_F(CpuAttentionTest, KvDecodeReproducesTrainingPath) {
  const int b = 2, t = 7, cap = 12, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d);
  std::vector<float> full(q.size()), lse(b * hq * t);
  be_.AttentionForward(full.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv,
                       d, 0);

  // KV cache [b, cap, hkv, d]: a prefill of 4 tokens, then one token at a time.
  std::vector<float> kc(b * cap * hkv * d, 0.0f), vc(b * cap * hkv * d, 0.0f);
  auto append = [&](int from, int count) {
    for (int bi = 0; bi < b; ++bi)
      for (int j = from; j < from + count; ++j)
        for (int e = 0; e < hkv * d; ++e) {
          kc[(bi * cap + j) * hkv * d + e] = k[(bi * t + j) * hkv * d + e];
          vc[(bi * cap + j) * hkv * d + e] = v[(bi * t + j) * hkv * d + e];
        }
  };
  // Queries [b, tq, hq, d] for positions from .. from + count - 1.
  auto queries = [&](int from, int count) {
    std::vector<float> qs(b * count * hq * d);
    for (int bi = 0; bi < b; ++bi)
      for (int i = 0; i < count; ++i)
        for (int e = 0; e < hq * d; ++e)
          qs[(bi * count + i) * hq * d + e] = q[(bi * t + from + i) * hq * d + e];
    return qs;
  };
  auto expect_rows = [&](const std::vector<float>& got, int from, int count) {
    for (int bi = 0; bi < b; ++bi)
      for (int i = 0; i < count; ++i)
        for (int e = 0; e < hq * d; ++e)
          EXPECT_NEAR(got[(bi * count + i) * hq * d + e], full[(bi * t + from + i) * hq * d + e],
                      1e-6)
              << "batch " << bi << " position " << from + i;
  };
  const int prefill = 4;
  append(0, prefill);
  auto q0 = queries(0, prefill);
  std::vector<float> out0(q0.size());
  be_.AttentionForward(out0.data(), nullptr, q0.data(), kc.data(), vc.data(), b, prefill, prefill,
                       cap, hq, hkv, d, 0);
  expect_rows(out0, 0, prefill);
  for (int pos = prefill; pos < t; ++pos) {
    append(pos, 1);
    auto q1 = queries(pos, 1);
    std::vector<float> out1(q1.size()), lse1(b * hq);
    be_.AttentionForward(out1.data(), lse1.data(), q1.data(), kc.data(), vc.data(), b, 1, pos + 1,
                         cap, hq, hkv, d, pos);
    expect_rows(out1, pos, 1);
    for (int r = 0; r < b * hq; ++r) EXPECT_NEAR(lse1[r], lse[r * t + pos], 1e-6) << "row " << r;
  }
}

}  // namespace
}  // namespace eellm::cpu_test
