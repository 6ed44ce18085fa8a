// Tolerances of the backend parity tests (a device result against the CPU backend's) and the
// element-by-element comparison that applies them; shared by the parity suite and the tests
// that run device kernels under the CPU emulation of tests/gpu/emu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iomanip>
#include <vector>

#include "engine/core/dtype.h"
#include "gtest/gtest.h"

namespace eellm::testing {

// A device element a matches the CPU's b when |a - b| <= atol * max|B| + rtol * |b|, with max|B|
// the largest magnitude in the reference tensor: atol is relative to the magnitude of the
// values, so that a near-zero result of a cancelling sum is judged against the size of what was
// summed rather than against itself. fp32 rounds to 2^-24 = 6e-8 relative; TF32 (10-bit
// mantissa inputs) to 2^-11 = 5e-4, so every tolerance below must stay under ~1e-4. Checked
// on the CPU: other summation orders (naive fp32 loops in reverse order for the GEMMs,
// attention, norms, softmax and embedding gradients; fp32 tree sums for SumSquares) stayed
// within 0.13 of every bound, while TF32-rounded GEMM inputs exceeded kGemm by 2-30x.
struct Tol {
  double rtol, atol;
};
// Copies, gathers, maxima and single correctly rounded IEEE operations (Fill, Add, Scale,
// EmbeddingForward(Range), EmbeddingAdd, RowMax, memory): there is no rounding freedom, so
// bit-exact.
constexpr Tol kExact{0, 0};
// Elementwise math (Axpy, GELU, SwiGLU, AdamW): a few roundings per element, FMA contraction on
// the device, exp/tanh/sqrt within 2 ulp: at most ~10 ulp = 6e-7. 1e-5 leaves 16x headroom and
// still catches any change of formula (the erf GELU differs from the tanh one by 1e-3). atol
// covers outputs that cancel, e.g. 1 + tanh(u) for x << 0, whose result is near 0.
constexpr Tol kElementwise{1e-5, 1e-6};
// Reductions over at most a few hundred terms, or a 1000-entry vocabulary row (norms, softmax
// cross-entropy, embedding and bias gradients): another summation order moves a k-term sum by
// ~sqrt(k) 2^-24 of sum|terms| (2e-6 for k = 1000), a tree order by at most log2(k) 2^-24.
constexpr Tol kReduction{1e-5, 1e-6};
// GEMM-based ops (Linear, LinearBackward, attention): dot products of up to 1000 terms in any
// order (tiles, split-K) differ by ~sqrt(K) 2^-24 of the typical output, K 2^-24 = 6e-5 of
// sum|terms| in the worst case. rtol 1e-4 is above that worst case; TF32 (must be off) errs by
// ~4e-4 on a typical element and fails.
constexpr Tol kGemmFp32{1e-4, 1e-5};
// Backends whose name has "bf16" (cuda-bf16) round GEMM operands to bf16 (8 significant bits,
// relative error 2^-9 per operand): a K-term dot product then errs by ~2^-8 sqrt(K) of
// sum|terms| / sqrt(K), about 1e-2 of the outputs' magnitude for K up to 1000. This only checks
// that such a backend computes the right thing, not its accuracy.
constexpr Tol kGemmBf16{2e-2, 2e-2};
// RoPE: elementwise, but the CPU computes the angle pos * theta^(-2i/d) and its cos/sin in
// double, while the usual device code (and Hugging Face) does it in fp32: the angle then errs by
// an ulp or two of itself (powf, the product), ~1e-4 rad near position 1000, and the rotated
// values by that much of their magnitude (measured: 3e-5 of max|x| at positions 1020-1024,
// head_dim 128). atol 1e-4 admits that up to positions of a few thousand; a wrong pairing,
// sign or frequency errs by O(1). Use kElementwise instead if the device angle is made exact.
constexpr Tol kRope{1e-5, 1e-4};

// Passes when every element of `got` is within `tol` of `want` (see Tol); otherwise names the
// number of bad elements and the worst one (index, both values, error against its bound).
inline ::testing::AssertionResult Close(const std::vector<float>& got,
                                        const std::vector<float>& want, Tol tol) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << ", want " << want.size();
  }
  double scale = 0;
  for (float b : want) {
    if (!std::isfinite(b)) return ::testing::AssertionFailure() << "reference is not finite";
    scale = std::max(scale, std::fabs(static_cast<double>(b)));
  }
  size_t bad = 0, worst_i = 0;
  double worst = 0;  // error / bound of the worst element (inf for NaN or a zero bound)
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double bound = tol.atol * scale + tol.rtol * std::fabs(static_cast<double>(want[i]));
    if (err <= bound) continue;
    ++bad;
    const double ratio = bound > 0 && !std::isnan(err) ? err / bound : INFINITY;
    if (bad == 1 || ratio > worst) worst = ratio, worst_i = i;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << std::setprecision(9) << bad << " of " << got.size()
         << " elements outside |a - b| <= " << tol.atol << " * " << scale << " + " << tol.rtol
         << " |b|; worst [" << worst_i << "]: got " << got[worst_i] << ", want " << want[worst_i]
         << " (" << worst << "x the bound)";
}

// x as a bf16 store leaves it (rounded to nearest even).
inline std::vector<float> RoundedToBf16(std::vector<float> x) {
  for (float& v : x) v = Bf16ToFloat(FloatToBf16(v));
  return x;
}

// Values stored in bf16 that follow the same roundings on both sides: within `tol` but for at
// most `max_share` of the elements, which may sit one bf16 step apart (adjacent bf16 bit patterns
// of one sign): fp32 noise tips a rounding the other way. At the bottom of a binade a step is
// 2^-7 of the value, past a relative tolerance of 2^-8 (an H200's fused attention: 3 of 12,800
// dq elements, -0.015625 against -0.0157470703125). A missing or extra rounding moves many
// elements, or by more.
inline ::testing::AssertionResult SameRoundingsButRareFlips(const std::vector<float>& got,
                                                            const std::vector<float>& want, Tol tol,
                                                            double max_share = 1e-3) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "sizes differ";
  double scale = 0;
  for (float b : want) scale = std::max(scale, std::fabs(static_cast<double>(b)));
  std::vector<float> got_rest = got;
  size_t flips = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const uint16_t a = FloatToBf16(got[i]).bits, b = FloatToBf16(want[i]).bits;
    const bool same_sign = (a & 0x8000) == (b & 0x8000);
    const bool adjacent = same_sign && (a == b + 1 || b == a + 1);
    const bool stored =
        Bf16ToFloat(FloatToBf16(got[i])) == got[i] && Bf16ToFloat(FloatToBf16(want[i])) == want[i];
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (adjacent && stored && err > tol.atol * scale + tol.rtol * std::fabs(want[i])) {
      ++flips;
      got_rest[i] = want[i];  // judged as a flip
    }
  }
  if (flips > max_share * static_cast<double>(got.size())) {
    return ::testing::AssertionFailure()
           << flips << " of " << got.size() << " elements one bf16 step apart (at most "
           << max_share << " of them may be)";
  }
  return Close(got_rest, want, tol);
}

}  // namespace eellm::testing
