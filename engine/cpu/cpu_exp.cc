// Vectorised exp (see cpu_exp.h): one inline formula, compiled into an AVX2 + FMA loop and a
// baseline loop, picked once at run time.
#include "engine/cpu/cpu_exp.h"

#include <cstdint>
#include <cstring>
#include <limits>

namespace eellm::cpu {
namespace {

// Branch-free (selects, not branches, so that the loops vectorise; the build passes
// -fno-trapping-math for this file so that the compiler may turn the comparisons into selects).
inline float ExpOne(float v) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in 16 bits
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float c = v < -103.0f ? -103.0f : v;
  c = c > 88.75f ? 88.75f : c;
  c = v != v ? 0.0f : c;  // NaN: a finite stand-in for the integer steps (the result is NaN)
  const float n = (c * kLog2e + kRound) - kRound;
  const float r = (c - n * kLn2Hi) - n * kLn2Lo;  // |r| <= ln 2 / 2
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n in two factors, so that n down to -149 (subnormal results) and up to 128 both work.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni / 2, n2 = ni - n1;
  const uint32_t bits1 = static_cast<uint32_t>(n1 + 127) << 23;  // n1, n2 in [-75, 64]
  const uint32_t bits2 = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &bits1, sizeof(float));
  std::memcpy(&s2, &bits2, sizeof(float));
  float y = p * s1 * s2;
  y = v > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  y = v < -103.9f ? 0.0f : y;
  return v != v ? v : y;
}

__attribute__((target("avx2,fma"))) void ExpAvx2(float* y, const float* x, size_t n, float a,
                                                 float b) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) y[i] = ExpOne(a * x[i] - b);
}

bool HaveAvx2Fma() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return have;
}

}  // namespace

void ExpBaseline(float* y, const float* x, size_t n, float a, float b) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) y[i] = ExpOne(a * x[i] - b);
}

void Exp(float* y, const float* x, size_t n, float a, float b) {
  (HaveAvx2Fma() ? ExpAvx2 : ExpBaseline)(y, x, n, a, b);
}

double SumExp(const float* x, size_t n, float b) {
  constexpr size_t kChunk = 256;
  float e[kChunk];
  double sum = 0.0;
  for (size_t i0 = 0; i0 < n; i0 += kChunk) {
    const size_t len = n - i0 < kChunk ? n - i0 : kChunk;
    Exp(e, x + i0, len, 1.0f, b);
    for (size_t j = 0; j < len; ++j) sum += e[j];
  }
  return sum;
}

}  // namespace eellm::cpu
