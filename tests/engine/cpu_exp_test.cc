// The CPU backend's vectorised exp (engine/cpu/cpu_exp.h) against the correctly rounded value,
// on both code paths (the one this CPU runs and the baseline), with the special values.
#include "engine/cpu/cpu_exp.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace eellm {
namespace {

using ExpFn = void (*)(float*, const float*, size_t, float, float);

// Largest error in units of the last place of exp(a x - b) rounded to float, over xs.
double MaxUlp(ExpFn fn, const std::vector<float>& xs, float a, float b) {
  std::vector<float> y(xs.size());
  fn(y.data(), xs.data(), xs.size(), a, b);
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float arg = a * xs[i] - b;  // as the function forms it (exact for a = +-1, b = 0)
    const double want = std::exp(static_cast<double>(arg));
    const float wf = static_cast<float>(want);
    const double ulp = std::nextafter(wf, std::numeric_limits<float>::infinity()) - wf;
    const double err = std::fabs(y[i] - want) / (ulp > 0 ? ulp : 1e-45);
    if (err > worst) worst = err;
  }
  return worst;
}

class CpuExp : public ::testing::TestWithParam<ExpFn> {};

// Arguments over [lo, hi), denser near 0 (relative steps), and a few chosen ones.
std::vector<float> Sweep(float lo, float hi) {
  std::vector<float> xs;
  for (float v = lo; v < hi; v += 0.0002f * (1.0f + std::fabs(v))) xs.push_back(v);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 0.5f, 88.7f, -87.3f}) {
    if (v >= lo && v < hi) xs.push_back(v);
  }
  return xs;
}

// The whole range where the result is finite and not below the smallest subnormal.
TEST_P(CpuExp, WithinTwoUlpOverTheRange) {
  const std::vector<float> xs = Sweep(-103.0f, 88.72f);
  ASSERT_GT(xs.size(), 30000u);
  EXPECT_LT(MaxUlp(GetParam(), xs, 1.0f, 0.0f), 2.0);
  EXPECT_LT(MaxUlp(GetParam(), Sweep(-88.72f, 103.0f), -1.0f, 0.0f), 2.0);  // exp(-x): sigmoid
}

TEST_P(CpuExp, SpecialValuesAndShift) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x = {-inf, inf, std::nanf(""), 100.0f, -200.0f, 0.0f, 3.0f};
  std::vector<float> y(x.size());
  GetParam()(y.data(), x.data(), x.size(), 1.0f, 0.0f);
  EXPECT_EQ(y[0], 0.0f);  // masked scores
  EXPECT_EQ(y[1], inf);
  EXPECT_TRUE(std::isnan(y[2]));
  EXPECT_EQ(y[3], inf);
  EXPECT_EQ(y[4], 0.0f);
  EXPECT_EQ(y[5], 1.0f);
  // In place, with a shift: exp(x - 3) of 3 is exactly 1.
  std::vector<float> z = x;
  GetParam()(z.data(), z.data(), z.size(), 1.0f, 3.0f);
  EXPECT_EQ(z[6], 1.0f);
  EXPECT_EQ(z[0], 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Paths, CpuExp, ::testing::Values(&cpu::Exp, &cpu::ExpBaseline));

TEST(CpuSumExp, AddsInIndexOrderAcrossChunks) {
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i) * 5.0f;
  std::vector<float> e(x.size());
  cpu::Exp(e.data(), x.data(), x.size(), 1.0f, 2.0f);
  double want = 0;
  for (float v : e) want += v;
  EXPECT_EQ(cpu::SumExp(x.data(), x.size(), 2.0f), want);  // same terms, same order: same bits
  double exact = 0;
  for (float v : x) exact += std::exp(static_cast<double>(v) - 2.0);
  EXPECT_NEAR(want, exact, 1e-6 * exact);
}

}  // namespace
}  // namespace eellm
