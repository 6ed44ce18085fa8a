// Helpers shared by the CPU backend tests: random vectors from eellm::Rng, blocks laid side by
// side in rows (InRows), a CpuBackend
// fixture, max-abs-difference checks and the central-difference gradient checker.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"

namespace eellm::cpu_test {

// n values ~ Normal(0, scale^2) (never all zeros).
inline std::vector<float> RandVec(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

// n values uniform in [lo, hi).
inline std::vector<float> UniformVec(Rng& rng, size_t n, double lo, double hi) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(lo + (hi - lo) * rng.Uniform());
  return v;
}

// The dense blocks `parts` (each [rows, its size / rows]) side by side in rows of `stride`
// elements, the rest of each row `fill`: e.g. q, k, v as the parts of rows [q | k | v | pad].
inline std::vector<float> InRows(std::initializer_list<const std::vector<float>*> parts, int rows,
                                 int stride, float fill) {
  std::vector<float> out(static_cast<size_t>(rows) * stride, fill);
  size_t at = 0;  // the part's first column
  for (const std::vector<float>* part : parts) {
    const size_t cols = part->size() / rows;
    EXPECT_LE(at + cols, static_cast<size_t>(stride));
    for (int r = 0; r < rows; ++r) {
      std::copy_n(part->begin() + r * cols, cols, out.begin() + r * stride + at);
    }
    at += cols;
  }
  return out;
}

// InRows' inverse: the leading columns of `rows` rows of `stride` elements, split into dense
// blocks of the given widths (e.g. dq, dk, dv out of rows [dq | dk | dv | pad]).
inline std::vector<std::vector<float>> OutOfRows(const std::vector<float>& in, int rows, int stride,
                                                 std::initializer_list<int> widths) {
  std::vector<std::vector<float>> parts;
  size_t at = 0;  // the part's first column
  for (const int cols : widths) {
    EXPECT_LE(at + cols, static_cast<size_t>(stride));
    std::vector<float>& part = parts.emplace_back(static_cast<size_t>(rows) * cols);
    for (int r = 0; r < rows; ++r) {
      std::copy_n(in.begin() + static_cast<size_t>(r) * stride + at, cols,
                  part.begin() + static_cast<size_t>(r) * cols);
    }
    at += cols;
  }
  return parts;
}

inline double MaxAbs(const std::vector<float>& a) {
  double m = 0.0;
  for (float x : a) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

template <typename A, typename B>
double MaxAbsDiff(const A& a, const B& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0.0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  }
  return m;
}

// sum_i out[i] * r[i] in double: the scalar loss L whose gradient w.r.t. out is r.
inline double Dot(const std::vector<float>& out, const std::vector<float>& r) {
  EXPECT_EQ(out.size(), r.size());
  double s = 0.0;
  for (size_t i = 0; i < out.size(); ++i) s += static_cast<double>(out[i]) * r[i];
  return s;
}

// Compares `analytic` = dL/dx with central differences (L(x + eps) - L(x - eps)) / 2eps,
// element by element on *x (restored afterwards). Passes when
// max|analytic - numeric| <= tol * max|analytic|; also requires max|analytic| >= min_scale so
// that a vanishing gradient cannot pass trivially.
inline void ExpectGradMatches(const std::string& what, std::vector<float>* x,
                              const std::vector<float>& analytic,
                              const std::function<double()>& loss, float eps = 1e-2f,
                              double tol = 2e-2, double min_scale = 1e-2) {
  ASSERT_EQ(x->size(), analytic.size()) << what;
  const double scale = MaxAbs(analytic);
  EXPECT_GE(scale, min_scale) << what << ": gradient is ~0, the check would be vacuous";
  double worst = 0.0;
  size_t worst_i = 0;
  std::vector<double> numeric(x->size());
  for (size_t i = 0; i < x->size(); ++i) {
    const float orig = (*x)[i];
    const float xp = orig + eps;
    const float xm = orig - eps;
    (*x)[i] = xp;
    const double lp = loss();
    (*x)[i] = xm;
    const double lm = loss();
    (*x)[i] = orig;
    numeric[i] = (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
    const double err = std::fabs(numeric[i] - analytic[i]);
    if (err > worst) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_LE(worst, tol * scale) << what << ": worst element " << worst_i << " analytic "
                                << analytic[worst_i] << " numeric " << numeric[worst_i]
                                << " (max|grad| " << scale << ")";
}

class CpuBackendTest : public ::testing::Test {
 protected:
  CpuBackend be_;
  Rng rng_{1234};
};

}  // namespace eellm::cpu_test
