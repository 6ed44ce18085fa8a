// Backend parity of the softmax cross-entropy (backend_parity.h): the fused CrossEntropy with and
// without max probabilities, gradients and weights (by confidence or not), and the
// vocabulary-parallel pieces (row maxima, sums and target logits, the losses from them, the
// gradient of a vocabulary range), on the backend under test against the CPU.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/core/rng.h"
#include "tests/gpu/backend_parity.h"

namespace eellm::parity {
namespace {

// Logits N(0, 2^2), with row 0 shifted by +100: exp without max-subtraction overflows there.
std::vector<float> Logits(Rng& rng, int n, int v) {
  auto logits = RandVec(rng, static_cast<size_t>(n) * v, 2.0);
  for (int j = 0; j < v; ++j) logits[j] += 100.0f;
  return logits;
}

// Per-row loss weights in [0, 2), every third row (from row 1) exactly 0.
std::vector<float> Weights(Rng& rng, int n) {
  auto w = UniformVec(rng, n, 0.0, 2.0);
  for (int r = 1; r < n; r += 3) w[r] = 0.0f;
  return w;
}

TEST_F(BackendParity, CrossEntropy) {
  for (int n : {1, 7, 64}) {
    for (int v : {11, 1000}) {
      const auto logits = Logits(rng_, n, v);
      const auto targets = Ids(n, v);
      const auto weights = Weights(rng_, n);
      const size_t nv = static_cast<size_t>(n) * v;
      for (bool with_max_prob : {false, true}) {
        for (int dl = 0; dl < 3; ++dl) {    // dlogits: none, separate, aliasing logits
          for (int wt = 0; wt < 4; ++wt) {  // weights: none, given; each by confidence or not
            const bool with_weights = wt % 2 == 1, by_confidence = wt >= 2;
            SCOPED_TRACE(::testing::Message()
                         << "n=" << n << " v=" << v << " max_prob=" << with_max_prob << " dlogits="
                         << (dl == 0   ? "null"
                             : dl == 1 ? "separate"
                                       : "aliased")
                         << " weights=" << with_weights << " by_confidence=" << by_confidence);
            ExpectParity(
                [&](Backend* be, DeviceMem& m) -> Outputs {
                  float *losses = m.Nan(n), *max_prob = with_max_prob ? m.Nan(n) : nullptr;
                  float* pl = m.Put(logits);
                  float* dlogits = dl == 0 ? nullptr : dl == 1 ? m.Nan(nv) : pl;
                  be->CrossEntropy(losses, max_prob, dlogits, pl, m.Put(targets),
                                   with_weights ? m.Put(weights) : nullptr, by_confidence, n, v);
                  Outputs o = {{"losses", m.Get(losses, n)}};
                  if (max_prob) o.emplace_back("max_prob", m.Get(max_prob, n));
                  if (dlogits) o.emplace_back("dlogits", m.Get(dlogits, nv));
                  return o;
                },
                kReduction);
          }
        }
      }
    }
  }
  // More rows than a GPU keeps blocks of the staged kernel (132 SMs x 6 at 256 threads): each
  // block takes several rows, the next row's copies overlapping this row's passes (weighted by
  // confidence too).
  const int n = 2000, v = 1000;
  const auto logits = Logits(rng_, n, v);
  const auto targets = Ids(n, v);
  const auto weights = Weights(rng_, n);
  ExpectParity(
      [&](Backend* be, DeviceMem& m) -> Outputs {
        float *losses = m.Nan(n), *max_prob = m.Nan(n), *pl = m.Put(logits);
        be->CrossEntropy(losses, max_prob, pl, pl, m.Put(targets), m.Put(weights), true, n, v);
        return {{"losses", m.Get(losses, n)},
                {"max_prob", m.Get(max_prob, n)},
                {"dlogits in place", m.Get(pl, static_cast<size_t>(n) * v)}};
      },
      kReduction);
}

// The vocabulary-parallel pieces on one rank's share of `v` columns starting at `start` of a
// vocabulary of 3 v: targets fall inside and outside the share.
TEST_F(BackendParity, VocabParallelCrossEntropyPieces) {
  for (int n : {1, 7, 64}) {
    for (int v : {11, 1000}) {
      for (int start : {0, v}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " v=" << v << " start=" << start);
        const auto logits = Logits(rng_, n, v);
        auto targets = Ids(n, 3 * v);
        targets[0] = start + v - 1;  // last column of the share
        const auto weights = Weights(rng_, n);
        const size_t nv = static_cast<size_t>(n) * v;
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* row_max = m.Nan(n);
              be->RowMax(row_max, m.Put(logits), n, v);
              return {{"row_max", m.Get(row_max, n)}};
            },
            kExact);
        // The global maximum and sum come from all ranks: at least the local ones.
        std::vector<float> row_max(n), sum_exp(n), target_logit(n);
        ref_.RowMax(row_max.data(), logits.data(), n, v);
        for (int r = 0; r < n; r += 2) row_max[r] += 0.7f;
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float *se = m.Nan(n), *tl = m.Nan(n);
              be->SumExpAndTarget(se, tl, m.Put(logits), m.Put(row_max), m.Put(targets), n, v,
                                  start);
              return {{"sum_exp", m.Get(se, n)}, {"target_logit", m.Get(tl, n)}};
            },
            kReduction);
        ref_.SumExpAndTarget(sum_exp.data(), target_logit.data(), logits.data(), row_max.data(),
                             targets.data(), n, v, start);
        for (float& s : sum_exp) s *= 1.3f;
        for (bool with_max_prob : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "max_prob=" << with_max_prob);
          ExpectParity(
              [&](Backend* be, DeviceMem& m) -> Outputs {
                float* losses = m.Nan(n);
                float* max_prob = with_max_prob ? m.Nan(n) : nullptr;
                be->CrossEntropyFromStats(losses, max_prob, m.Put(row_max), m.Put(sum_exp),
                                          m.Put(target_logit), n);
                Outputs out = {{"losses", m.Get(losses, n)}};
                if (with_max_prob) out.push_back({"max_prob", m.Get(max_prob, n)});
                return out;
              },
              kReduction);
        }
        for (bool alias : {false, true}) {
          for (int wt = 0; wt < 4; ++wt) {
            const bool with_weights = wt % 2 == 1, by_confidence = wt >= 2;
            SCOPED_TRACE(::testing::Message() << "alias=" << alias << " weights=" << with_weights
                                              << " by_confidence=" << by_confidence);
            ExpectParity(
                [&](Backend* be, DeviceMem& m) -> Outputs {
                  float* pl = m.Put(logits);
                  float* dl = alias ? pl : m.Nan(nv);
                  be->CrossEntropyGradRange(dl, pl, m.Put(row_max), m.Put(sum_exp), m.Put(targets),
                                            with_weights ? m.Put(weights) : nullptr, by_confidence,
                                            n, v, start);
                  return {{"dlogits", m.Get(dl, nv)}};
                },
                kReduction);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace eellm::parity
