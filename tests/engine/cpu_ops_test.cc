// Forward-value checks of the CpuBackend ops against naive double-precision references
// written here: memory and elementwise ops, embedding, Linear, LayerNorm, RMSNorm, GELU,
// SwiGLU, RoPE, cross-entropy and AdamW. Attention lives in cpu_attention_test.cc.
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"

namespace eellm::cpu_test {
namespace {

using CpuOpsTest = CpuBackendTest;

TEST_F(CpuOpsTest, AllocIsAlignedAndCopiesRoundTrip) {
  for (size_t bytes : {size_t{1}, size_t{4}, size_t{100}, size_t{4096}}) {
    void* p = be_.Alloc(bytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
    be_.Free(p);
  }
  auto src = RandVec(rng_, 100);
  std::vector<float> dst(100), back(100);
  float* dev = static_cast<float*>(be_.Alloc(400));
  be_.CopyFromHost(dev, src.data(), 400);
  be_.Copy(dst.data(), dev, 400);
  be_.CopyToHost(back.data(), dev, 400);
  be_.Synchronize();
  be_.Free(dev);
  EXPECT_EQ(dst, src);
  EXPECT_EQ(back, src);
}

TEST_F(CpuOpsTest, ElementwiseAndSumSquares) {
  // Large enough to take the parallel paths.
  const size_t n = 100003;
  auto a = RandVec(rng_, n), b = RandVec(rng_, n);
  std::vector<float> y(n);
  be_.Add(y.data(), a.data(), b.data(), n);
  for (size_t i = 0; i < n; i += 997) EXPECT_EQ(y[i], a[i] + b[i]);
  be_.Add(a.data(), a.data(), b.data(), n);  // y aliases a
  EXPECT_EQ(a, y);
  be_.Axpy(y.data(), 0.5f, b.data(), n);
  be_.Scale(y.data(), 2.0f, n);
  for (size_t i = 0; i < n; i += 997) EXPECT_FLOAT_EQ(y[i], 2.0f * (a[i] + 0.5f * b[i]));
  double ref = 0.0;
  for (float x : b) ref += static_cast<double>(x) * x;
  EXPECT_NEAR(be_.SumSquares(b.data(), n), ref, 1e-9 * ref);
  EXPECT_EQ(be_.SumSquares(b.data(), 7), [&] {
    double s = 0.0;
    for (int i = 0; i < 7; ++i) s += static_cast<double>(b[i]) * b[i];
    return s;
  }());
  be_.Fill(y.data(), n, -3.5f);
  for (float x : y) ASSERT_EQ(x, -3.5f);
}

// Hidden dropout: about p of the elements dropped (independently of the row and column), the
// rest scaled by 1 / (1 - p); the mask is a function of (key, global element number) alone, so
// rows taken from row0 + 3 on are rows 3.. of a pass from row0; the backward uses the same mask.
TEST_F(CpuOpsTest, DropoutDropsAFractionPWithAFixedMask) {
  const int n = 300, c = 347;
  const size_t nc = static_cast<size_t>(n) * c;
  const auto x = RandVec(rng_, nc), branch = RandVec(rng_, nc);
  for (float p : {0.1f, 0.5f}) {
    std::vector<float> out(nc), grad(nc), shifted(static_cast<size_t>(n - 3) * c);
    be_.DropoutAdd(out.data(), x.data(), branch.data(), n, c, p, 77, 1000);
    be_.DropoutBackward(grad.data(), branch.data(), n, c, p, 77, 1000);
    size_t dropped = 0, dropped_col0 = 0;
    const float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < nc; ++i) {
      const bool kept = out[i] != x[i];
      dropped += !kept;
      dropped_col0 += !kept && i % c == 0;
      ASSERT_EQ(out[i], kept ? x[i] + branch[i] * scale : x[i]) << i;
      ASSERT_EQ(grad[i], kept ? branch[i] * scale : 0.0f) << i;  // the same mask
    }
    // Binomial: 4 standard deviations.
    const double sd = std::sqrt(nc * p * (1 - p)), sd_col = std::sqrt(n * p * (1 - p));
    EXPECT_NEAR(static_cast<double>(dropped), nc * p, 4 * sd) << p;
    EXPECT_NEAR(static_cast<double>(dropped_col0), n * p, 4 * sd_col) << p;
    be_.DropoutBackward(shifted.data(), branch.data() + 3 * c, n - 3, c, p, 77, 1003);
    for (size_t i = 0; i < shifted.size(); ++i) ASSERT_EQ(shifted[i], grad[i + 3 * c]) << i;
    std::vector<float> other(nc);
    be_.DropoutBackward(other.data(), branch.data(), n, c, p, 78, 1000);  // another key
    EXPECT_NE(other, grad);
  }
}

TEST_F(CpuOpsTest, EmbeddingForward) {
  const int vocab = 5, c = 3;
  auto table = RandVec(rng_, vocab * c);
  const std::vector<int32_t> ids = {4, 0, 4, 2};
  std::vector<float> out(ids.size() * c);
  be_.EmbeddingForward(out.data(), ids.data(), table.data(), 4, c);
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < c; ++j) EXPECT_EQ(out[t * c + j], table[ids[t] * c + j]);
}

TEST_F(CpuOpsTest, EmbeddingAddAddsTheRowOfEachId) {
  const int rows = 5, c = 3;
  const auto table = RandVec(rng_, rows * c), base = RandVec(rng_, 4 * c);
  const std::vector<int32_t> ids = {4, 0, 4, 2};
  std::vector<float> out = base;
  be_.EmbeddingAdd(out.data(), ids.data(), table.data(), 4, c);
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < c; ++j) EXPECT_EQ(out[t * c + j], base[t * c + j] + table[ids[t] * c + j]);
}

TEST_F(CpuOpsTest, LinearMatchesReference) {
  const int n = 7, in = 33, out = 19;
  auto x = RandVec(rng_, n * in), w = RandVec(rng_, out * in), bias = RandVec(rng_, out);
  std::vector<double> ref(n * out);
  for (int r = 0; r < n; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0.0;
      for (int i = 0; i < in; ++i) s += static_cast<double>(x[r * in + i]) * w[o * in + i];
      ref[r * out + o] = s;
    }
  std::vector<float> y(n * out, 123.0f);
  be_.Linear(y.data(), x.data(), w.data(), nullptr, n, in, out, false);
  EXPECT_LT(MaxAbsDiff(y, ref), 1e-4);
  be_.Linear(y.data(), x.data(), w.data(), bias.data(), n, in, out, false);
  for (int r = 0; r < n; ++r)
    for (int o = 0; o < out; ++o) ref[r * out + o] += bias[o];
  EXPECT_LT(MaxAbsDiff(y, ref), 1e-4);
  // accumulate: out += in @ w^T + bias.
  std::vector<float> acc(n * out, 1.0f);
  be_.Linear(acc.data(), x.data(), w.data(), bias.data(), n, in, out, true);
  for (double& v : ref) v += 1.0;
  EXPECT_LT(MaxAbsDiff(acc, ref), 1e-4);
}

TEST_F(CpuOpsTest, LayerNormMatchesReference) {
  const int n = 5, c = 37;
  auto x = RandVec(rng_, n * c, 3.0), g = RandVec(rng_, c), b = RandVec(rng_, c);
  for (float& v : x) v += 10.0f;  // a large mean must not hurt the variance
  std::vector<float> y(n * c), mean(n), rstd(n), y_nob(n * c);
  be_.LayerNormForward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), n, c,
                       1e-5f);
  be_.LayerNormForward(y_nob.data(), mean.data(), rstd.data(), x.data(), g.data(), nullptr, n, c,
                       1e-5f);
  for (int r = 0; r < n; ++r) {
    double mu = 0.0, var = 0.0;
    for (int j = 0; j < c; ++j) mu += x[r * c + j];
    mu /= c;
    for (int j = 0; j < c; ++j) var += (x[r * c + j] - mu) * (x[r * c + j] - mu);
    var /= c;
    const double rs = 1.0 / std::sqrt(var + 1e-5);
    EXPECT_NEAR(mean[r], mu, 1e-5);
    EXPECT_NEAR(rstd[r], rs, 1e-5 * rs);
    for (int j = 0; j < c; ++j) {
      const double nrm = (x[r * c + j] - mu) * rs;
      EXPECT_NEAR(y[r * c + j], nrm * g[j] + b[j], 1e-4);
      EXPECT_NEAR(y_nob[r * c + j], nrm * g[j], 1e-4);
    }
  }
}

TEST_F(CpuOpsTest, RmsNormMatchesReference) {
  const int n = 5, c = 37;
  auto x = RandVec(rng_, n * c, 3.0), g = RandVec(rng_, c);
  std::vector<float> y(n * c), rstd(n);
  be_.RmsNormForward(y.data(), rstd.data(), x.data(), g.data(), n, c, 1e-6f);
  for (int r = 0; r < n; ++r) {
    double ms = 0.0;
    for (int j = 0; j < c; ++j) ms += static_cast<double>(x[r * c + j]) * x[r * c + j];
    const double rs = 1.0 / std::sqrt(ms / c + 1e-6);
    EXPECT_NEAR(rstd[r], rs, 1e-5 * rs);
    for (int j = 0; j < c; ++j) EXPECT_NEAR(y[r * c + j], x[r * c + j] * rs * g[j], 1e-4);
  }
}

TEST_F(CpuOpsTest, GeluAndSwiGluMatchFormulas) {
  const size_t n = 64;
  auto x = RandVec(rng_, n, 3.0), up = RandVec(rng_, n);
  std::vector<float> y(n), s(n);
  be_.GeluForward(y.data(), x.data(), n);
  be_.SwiGluForward(s.data(), x.data(), up.data(), 4, n / 4, n / 4);
  for (size_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const double gelu =
        0.5 * xi * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (xi + 0.044715 * xi * xi * xi)));
    EXPECT_NEAR(y[i], gelu, 1e-5 * (1.0 + std::fabs(gelu)));
    const double silu = xi / (1.0 + std::exp(-xi));
    EXPECT_NEAR(s[i], silu * up[i], 1e-5 * (1.0 + std::fabs(silu * up[i])));
  }
  // Known GELU values (tanh approximation): gelu(1) = 0.841192, gelu(-1) = -0.158808.
  const float pts[2] = {1.0f, -1.0f};
  float vals[2];
  be_.GeluForward(vals, pts, 2);
  EXPECT_NEAR(vals[0], 0.841192, 1e-5);
  EXPECT_NEAR(vals[1], -0.158808, 1e-5);
}

// Llama 3.1 8B's RoPE: theta 500,000, head 128, scaled by 8 below 1/8,192 of a turn per token.
RopeParams Llama31Rope() {
  RopeParams r;
  r.theta = 500000.0f;
  r.scaling = {RopeScalingKind::kLlama3, 8.0f, 1.0f, 4.0f, 8192};
  return r;
}

TEST_F(CpuOpsTest, RopeMatchesRotateHalfReference) {
  const int n = 4, heads = 3, hd = 16;
  const float theta = 10000.0f;
  const std::vector<int32_t> pos = {0, 1, 7, 1000};
  for (const bool scaled : {false, true}) {
    RopeParams rope{theta};
    if (scaled) rope.scaling = {RopeScalingKind::kLlama3, 4.0f, 1.0f, 2.0f, 64};
    auto x = RandVec(rng_, n * heads * hd);
    std::vector<float> y = x;
    be_.RopeForward(y.data(), pos.data(), n, heads, hd, heads * hd, rope);
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < hd / 2; ++i) {
          const size_t o = (static_cast<size_t>(t) * heads + h) * hd;
          const double plain = std::pow(static_cast<double>(theta), -2.0 * i / hd);
          // Scaled: pairs 0-1 turn more than 2 pi / 32 per token (kept), pair 2 in between
          // (blended), the rest less than 2 pi / 64 (divided by 4).
          const double scale = !scaled || i < 2 ? 1.0 : (i < 3 ? 0.0 : 0.25);
          if (scale == 0.0) {
            EXPECT_LT(RopeInvFreq(rope, i, hd), plain);
            EXPECT_GT(RopeInvFreq(rope, i, hd), plain / 4);
          }
          const double ang = pos[t] * (scale == 0.0 ? RopeInvFreq(rope, i, hd) : plain * scale);
          const double a = x[o + i], b = x[o + i + hd / 2];
          EXPECT_NEAR(y[o + i], a * std::cos(ang) - b * std::sin(ang), 1e-5);
          EXPECT_NEAR(y[o + i + hd / 2], b * std::cos(ang) + a * std::sin(ang), 1e-5);
          // Each pair keeps its norm; position 0 is the identity.
          const double n0 = a * a + b * b;
          const double n1 = static_cast<double>(y[o + i]) * y[o + i] +
                            static_cast<double>(y[o + i + hd / 2]) * y[o + i + hd / 2];
          EXPECT_NEAR(n1, n0, 1e-5 * (1.0 + n0));
          if (pos[t] == 0) {
            EXPECT_EQ(y[o + i], x[o + i]);
            EXPECT_EQ(y[o + i + hd / 2], x[o + i + hd / 2]);
          }
        }
    // The backward (inverse rotation) undoes the forward.
    be_.RopeBackward(y.data(), pos.data(), n, heads, hd, heads * hd, rope);
    EXPECT_LT(MaxAbsDiff(y, x), 1e-5);
  }
}

// The "llama3" scaling as transformers computes it (_compute_llama3_parameters): per wavelength
// band, kept, divided by the factor, or blended; continuous across the band edges, and the
// frequencies still fall with the pair index.
TEST_F(CpuOpsTest, Llama3RopeScalingKeepsHighAndDividesLowFrequencies) {
  const RopeParams rope = Llama31Rope();
  const RopeParams plain{rope.theta};
  int kept = 0, divided = 0, blended = 0;
  double last = 2.0;
  for (int i = 0; i < 64; ++i) {
    const double f0 = RopeInvFreq(plain, i, 128), f = RopeInvFreq(rope, i, 128);
    EXPECT_DOUBLE_EQ(f0, std::pow(500000.0, -i / 64.0));
    const double wavelength = 2 * M_PI / f0;
    if (wavelength < 8192 / 4.0) {
      EXPECT_EQ(f, f0) << i;
      ++kept;
    } else if (wavelength > 8192 / 1.0) {
      EXPECT_NEAR(f, f0 / 8, 1e-15 * f0) << i;
      ++divided;
    } else {
      // Blend weight s = (8192 / wavelength - 1) / (4 - 1) of f0 against f0 / 8.
      const double s = (8192 / wavelength - 1) / 3;
      EXPECT_NEAR(f, f0 / 8 + s * (f0 - f0 / 8), 1e-15 * f0) << i;
      EXPECT_GT(s, 0);
      EXPECT_LT(s, 1);
      ++blended;
    }
    EXPECT_LT(f, last) << i;
    last = f;
  }
  // Llama 3.1's 64 pairs: 29 kept (wavelength under 2,048), 29 divided (over 8,192), 6 blended.
  EXPECT_EQ(kept, 29);
  EXPECT_EQ(divided, 29);
  EXPECT_EQ(blended, 6);
  // Continuity at the band edges: pair 1 of a head of 2 turns by 1 / theta, so its wavelength
  // is 2 pi theta; one 1e-4 below and one 1e-4 above each edge land in the two bands beside it,
  // and must give nearly the same frequency.
  for (const double edge : {2048.0, 8192.0}) {
    for (const double side : {1 - 1e-4, 1 + 1e-4}) {
      RopeParams r = rope;
      r.theta = static_cast<float>(edge * side / (2 * M_PI));
      const double f0 = 1.0 / r.theta, f = RopeInvFreq(r, 1, 2);
      EXPECT_NEAR(f, edge == 2048.0 ? f0 : f0 / 8, 1e-3 * f0) << edge << " " << side;
    }
  }
  // Linear scaling divides every frequency.
  RopeParams linear{rope.theta};
  linear.scaling = {RopeScalingKind::kLinear, 4.0f};
  for (int i = 0; i < 64; ++i) {
    EXPECT_DOUBLE_EQ(RopeInvFreq(linear, i, 128), RopeInvFreq(plain, i, 128) / 4) << i;
  }
}

TEST_F(CpuOpsTest, CrossEntropyLossAndMaxProb) {
  const int n = 3, v = 11;
  auto logits = RandVec(rng_, n * v, 2.0);
  for (int j = 0; j < v; ++j) logits[2 * v + j] += 1000.0f;  // stability: huge logits
  const std::vector<int32_t> targets = {3, 10, 0};
  std::vector<float> losses(n), max_prob(n);
  be_.CrossEntropy(losses.data(), max_prob.data(), nullptr, logits.data(), targets.data(), nullptr,
                   false, n, v);
  for (int r = 0; r < n; ++r) {
    double mx = -1e300;
    for (int j = 0; j < v; ++j) mx = std::max(mx, static_cast<double>(logits[r * v + j]));
    double sum = 0.0;
    for (int j = 0; j < v; ++j) sum += std::exp(logits[r * v + j] - mx);
    const double loss = std::log(sum) + mx - logits[r * v + targets[r]];
    EXPECT_TRUE(std::isfinite(losses[r]));
    EXPECT_NEAR(losses[r], loss, 1e-5 * (1.0 + loss));
    EXPECT_NEAR(max_prob[r], 1.0 / sum, 1e-6);
  }
}

// by_confidence weights each row's gradient by weights[r] times the row's max probability (the
// fp32 product), in the fused op and in the vocabulary-range gradient alike: the same bits as
// the plain op given those products as weights.
TEST_F(CpuOpsTest, CrossEntropyByConfidenceWeightsRowsByTheirMaxProbability) {
  const int n = 5, v = 13;
  const auto logits = RandVec(rng_, n * v, 2.0);
  const std::vector<int32_t> targets = {3, 12, 0, 7, 7};
  const std::vector<float> weights = {0.5f, 0.0f, 1.5f, 2.0f, 0.25f};
  std::vector<float> losses(n), max_prob(n), got(n * v), want(n * v);
  be_.CrossEntropy(losses.data(), max_prob.data(), got.data(), logits.data(), targets.data(),
                   weights.data(), true, n, v);
  std::vector<float> products(n);
  for (int r = 0; r < n; ++r) {
    EXPECT_GT(max_prob[r], 1.0f / v) << r;  // (not uniform rows: the weights differ)
    products[r] = weights[r] * max_prob[r];
  }
  std::vector<float> plain_losses(n);
  be_.CrossEntropy(plain_losses.data(), nullptr, want.data(), logits.data(), targets.data(),
                   products.data(), false, n, v);
  EXPECT_EQ(losses, plain_losses);  // the losses themselves are unweighted
  EXPECT_EQ(got, want);
  // The range form with the row statistics (max probability 1 / sum_exp).
  std::vector<float> row_max(n), sum_exp(n), target_logit(n);
  be_.RowMax(row_max.data(), logits.data(), n, v);
  be_.SumExpAndTarget(sum_exp.data(), target_logit.data(), logits.data(), row_max.data(),
                      targets.data(), n, v, 0);
  for (int r = 0; r < n; ++r) products[r] = weights[r] * (1.0f / sum_exp[r]);
  be_.CrossEntropyGradRange(got.data(), logits.data(), row_max.data(), sum_exp.data(),
                            targets.data(), weights.data(), true, n, v, 0);
  be_.CrossEntropyGradRange(want.data(), logits.data(), row_max.data(), sum_exp.data(),
                            targets.data(), products.data(), false, n, v, 0);
  EXPECT_EQ(got, want);
  for (int j = 0; j < v; ++j) EXPECT_EQ(got[v + j], 0.0f) << "row 1 has weight 0";
}

TEST_F(CpuOpsTest, AdamWOneStepMatchesFormula) {
  const size_t n = 9;
  auto p = RandVec(rng_, n), g = RandVec(rng_, n), m = RandVec(rng_, n, 0.1);
  auto v = UniformVec(rng_, n, 0.0, 0.1);
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  const int step = 3;
  std::vector<float> p2 = p, m2 = m, v2 = v;
  be_.AdamW(p2.data(), g.data(), m2.data(), v2.data(), n, lr, b1, b2, eps, wd, step);
  for (size_t i = 0; i < n; ++i) {
    const double mi = b1 * static_cast<double>(m[i]) + (1.0 - b1) * g[i];
    const double vi = b2 * static_cast<double>(v[i]) + (1.0 - b2) * g[i] * g[i];
    const double m_hat = mi / (1.0 - std::pow(static_cast<double>(b1), step));
    const double v_hat = vi / (1.0 - std::pow(static_cast<double>(b2), step));
    const double pi = p[i] - lr * (m_hat / (std::sqrt(v_hat) + eps) + wd * p[i]);
    EXPECT_NEAR(m2[i], mi, 1e-6);
    EXPECT_NEAR(v2[i], vi, 1e-6);
    EXPECT_NEAR(p2[i], pi, 1e-6);
  }
}

}  // namespace
}  // namespace eellm::cpu_test
