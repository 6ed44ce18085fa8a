// Checks of CpuBackend causal GQA attention: the forward against a naive double reference (with
// q_offset and tk_cap > tk, and over several query blocks), the saved log-sum-exps, GQA == MHA
// with repeated KV heads, the KV-cache decode path reproducing the training path row by row,
// paged KV caches, and the backward over several query blocks against a naive double reference.
#include <algorithm>
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

// Naive attention backward in double (the same layouts): dq, dk, dv of sum(out * dout).
void RefAttentionBackward(const std::vector<float>& q, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<float>& dout, int b, int t,
                          int hq, int hkv, int d, std::vector<double>* dq, std::vector<double>* dk,
                          std::vector<double>* dv) {
  dq->assign(q.size(), 0.0);
  dk->assign(k.size(), 0.0);
  dv->assign(v.size(), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto qi = [&](int bi, int i, int h, int e) { return ((bi * t + i) * hq + h) * d + e; };
  auto kj = [&](int bi, int j, int h, int e) { return ((bi * t + j) * hkv + h) * d + e; };
  for (int bi = 0; bi < b; ++bi)
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < t; ++i) {
        const int kvh = h / (hq / hkv);
        std::vector<double> p(i + 1), dp(i + 1);
        double mx = -1e300, sum = 0.0, dsum = 0.0;
        for (int j = 0; j <= i; ++j) {
          double dot = 0.0;
          for (int e = 0; e < d; ++e) dot += double{q[qi(bi, i, h, e)]} * k[kj(bi, j, kvh, e)];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (int j = 0; j <= i; ++j) {
          p[j] /= sum;
          double dot = 0.0;
          for (int e = 0; e < d; ++e) dot += double{dout[qi(bi, i, h, e)]} * v[kj(bi, j, kvh, e)];
          dp[j] = dot;
          dsum += p[j] * dp[j];
          for (int e = 0; e < d; ++e) (*dv)[kj(bi, j, kvh, e)] += p[j] * dout[qi(bi, i, h, e)];
        }
        for (int j = 0; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - dsum) * scale;
          for (int e = 0; e < d; ++e) {
            (*dq)[qi(bi, i, h, e)] += ds * k[kj(bi, j, kvh, e)];
            (*dk)[kj(bi, j, kvh, e)] += ds * q[qi(bi, i, h, e)];
          }
        }
      }
}

TEST_F(CpuAttentionTest, TrainingPathMatchesReference) {
  const int b = 2, t = 6, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d);
  std::vector<float> out(q.size()), lse(b * hq * t, 42.0f);
  be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv, d,
                       0, hq * d, hkv * d);
  std::vector<double> ref_out, ref_lse;
  RefAttention(q, k, v, b, t, t, t, hq, hkv, d, 0, &ref_out, &ref_lse);
  EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5);
  EXPECT_LT(MaxAbsDiff(lse, ref_lse), 1e-5);
  // The first query sees only itself: its log-sum-exp is its own scaled score.
  double s00 = 0.0;
  for (int e = 0; e < d; ++e) s00 += static_cast<double>(q[e]) * k[e];
  EXPECT_NEAR(lse[0], s00 / std::sqrt(static_cast<double>(d)), 1e-6);
}

// More queries than one block (64 rows): full blocks and a partial last one, also when the
// queries start after cached keys.
TEST_F(CpuAttentionTest, SeveralQueryBlocksMatchReference) {
  struct Case {
    int tq, q_offset, tk_cap;
  };
  for (const Case& c : {Case{150, 0, 150}, Case{100, 30, 140}, Case{64, 0, 64}}) {
    SCOPED_TRACE(::testing::Message() << "tq " << c.tq << " q_offset " << c.q_offset);
    const int b = 2, hq = 4, hkv = 2, d = 8, tk = c.q_offset + c.tq;
    auto q = RandVec(rng_, b * c.tq * hq * d), k = RandVec(rng_, b * c.tk_cap * hkv * d);
    auto v = RandVec(rng_, b * c.tk_cap * hkv * d);
    std::vector<float> out(q.size()), lse(b * hq * c.tq);
    be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, c.tq, tk,
                         c.tk_cap, hq, hkv, d, c.q_offset, hq * d, hkv * d);
    std::vector<double> ref_out, ref_lse;
    RefAttention(q, k, v, b, c.tq, tk, c.tk_cap, hq, hkv, d, c.q_offset, &ref_out, &ref_lse);
    EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5);
    EXPECT_LT(MaxAbsDiff(lse, ref_lse), 1e-5);
  }
}

TEST_F(CpuAttentionTest, BackwardOverSeveralQueryBlocksMatchesReference) {
  const int b = 2, t = 150, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d), dout = RandVec(rng_, b * t * hq * d);
  std::vector<float> out(q.size()), lse(b * hq * t);
  be_.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv, d,
                       0, hq * d, hkv * d);
  std::vector<float> dq(q.size(), 7.0f), dk(k.size(), 7.0f), dv(v.size(), 7.0f);  // written
  be_.AttentionBackward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(),
                        q.data(), k.data(), v.data(), b, t, hq, hkv, d, hq * d, hkv * d);
  std::vector<double> ref_dq, ref_dk, ref_dv;
  RefAttentionBackward(q, k, v, dout, b, t, hq, hkv, d, &ref_dq, &ref_dk, &ref_dv);
  EXPECT_LT(MaxAbsDiff(dq, ref_dq), 1e-5);
  EXPECT_LT(MaxAbsDiff(dk, ref_dk), 1e-5);
  EXPECT_LT(MaxAbsDiff(dv, ref_dv), 1e-5);
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
                       hkv, d, q_offset, hq * d, hkv * d);
  std::vector<double> ref_out, ref_lse;
  RefAttention(q, k, v, b, tq, tk, tk_cap, hq, hkv, d, q_offset, &ref_out, &ref_lse);
  EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5);
  EXPECT_LT(MaxAbsDiff(lse, ref_lse), 1e-5);
}

// A paged KV cache: the sequence's keys lie in pages scattered over a pool (some adjacent, so
// that runs merge), whose other rows hold garbage. Decode, a chunk after cached keys, and a
// prefill over two query blocks match the reference on the keys gathered in order.
TEST_F(CpuAttentionTest, PagedKeysMatchReference) {
  const int hq = 4, hkv = 2, d = 8, page = 16, pool_pages = 12;
  const std::vector<int32_t> table = {7, 2, 3, 9, 0, 5, 6, 11};  // 128 positions
  const int row = hkv * d;
  auto k_pool = RandVec(rng_, pool_pages * page * row), v_pool = RandVec(rng_, k_pool.size());
  std::vector<bool> used(pool_pages);
  for (int32_t p : table) used[p] = true;
  for (int p = 0; p < pool_pages; ++p) {
    for (int e = 0; !used[p] && e < page * row; ++e) {
      k_pool[p * page * row + e] = 1e4f;
      v_pool[p * page * row + e] = NAN;
    }
  }
  const KvPageTable pages{table.data(), table.data(), page, static_cast<int>(table.size())};
  struct Case {
    int tq, q_offset;
  };
  for (const Case& c : {Case{1, 0}, Case{1, 37}, Case{5, 44}, Case{70, 0}, Case{21, 107}}) {
    const int tk = c.q_offset + c.tq;
    std::vector<float> k(tk * row), v(tk * row);  // the keys in position order
    for (int j = 0; j < tk; ++j) {
      const int64_t r = pages.Row(j);
      std::copy_n(&k_pool[r * row], row, &k[j * row]);
      std::copy_n(&v_pool[r * row], row, &v[j * row]);
    }
    auto q = RandVec(rng_, c.tq * hq * d);
    std::vector<float> out(q.size(), NAN);
    be_.PagedAttentionForward(out.data(), q.data(), k_pool.data(), v_pool.data(), pages, c.tq, hq,
                              hkv, d, c.q_offset, hq * d);
    std::vector<double> ref_out, ref_lse;
    RefAttention(q, k, v, 1, c.tq, tk, tk, hq, hkv, d, c.q_offset, &ref_out, &ref_lse);
    EXPECT_LT(MaxAbsDiff(out, ref_out), 1e-5) << "tq " << c.tq << " q_offset " << c.q_offset;
  }
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
                       d, 0, hq * d, hkv * d);
  be_.AttentionForward(out_mha.data(), nullptr, q.data(), k_rep.data(), v_rep.data(), b, t, t, t,
                       hq, hq, d, 0, hq * d, hq * d);
  EXPECT_EQ(MaxAbsDiff(out_gqa, out_mha), 0.0);
}

TEST_F(CpuAttentionTest, KvDecodeReproducesTrainingPath) {
  const int b = 2, t = 7, cap = 12, hq = 4, hkv = 2, d = 8;
  auto q = RandVec(rng_, b * t * hq * d), k = RandVec(rng_, b * t * hkv * d);
  auto v = RandVec(rng_, b * t * hkv * d);
  std::vector<float> full(q.size()), lse(b * hq * t);
  be_.AttentionForward(full.data(), lse.data(), q.data(), k.data(), v.data(), b, t, t, t, hq, hkv,
                       d, 0, hq * d, hkv * d);

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
                       cap, hq, hkv, d, 0, hq * d, hkv * d);
  expect_rows(out0, 0, prefill);
  for (int pos = prefill; pos < t; ++pos) {
    append(pos, 1);
    auto q1 = queries(pos, 1);
    std::vector<float> out1(q1.size()), lse1(b * hq);
    be_.AttentionForward(out1.data(), lse1.data(), q1.data(), kc.data(), vc.data(), b, 1, pos + 1,
                         cap, hq, hkv, d, pos, hq * d, hkv * d);
    expect_rows(out1, pos, 1);
    for (int r = 0; r < b * hq; ++r) EXPECT_NEAR(lse1[r], lse[r * t + pos], 1e-6) << "row " << r;
  }
}

}  // namespace
}  // namespace eellm::cpu_test
