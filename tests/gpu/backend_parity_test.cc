// Backend parity suite (the idea of ggml's test-backend-ops): every op of engine/backend.h runs
// on the backend under test and on the CPU backend (the numerical oracle) with the same random
// inputs, and the results are compared element by element within the tolerances stated below.
// The backend under test is named by EELLM_PARITY_BACKEND (default "cuda"); where it cannot be
// made (no GPU, a build without CUDA) every test skips. EELLM_PARITY_BACKEND=cpu runs the CPU
// against itself, which checks the harness. Attention and the cross-entropy are in
// attention_parity_test.cc and cross_entropy_parity_test.cc, the whole-model training step in
// model_parity_test.cc.
//
// Outputs documented as written are poisoned with NaN on the device before the call (every
// element must be written); accumulated outputs are pre-filled with random values (the result
// must be initial + contribution). Every device buffer is followed by a guard zone that must
// survive the call (no writes past the end, e.g. by vectorised tails of odd sizes).
#include "tests/gpu/backend_parity.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/backend.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/device_mem.h"
#include "tests/gpu/parity_backend.h"
#include "tests/gpu/parity_tolerances.h"

namespace eellm::parity {
namespace {

// Elementwise sizes: empty, tiny, odd, not a multiple of 32/128, and large with an odd tail.
const size_t kSizes[] = {0, 1, 7, 33, 1000, 1000003};

TEST_F(BackendParity, MemoryRoundTripsAreBitExact) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{1000003}}) {
    for (size_t off : {size_t{0}, size_t{3}}) {  // offsets 3 and 5 are unaligned
      SCOPED_TRACE(::testing::Message() << bytes << " bytes at offset " << off);
      std::vector<uint8_t> payload(bytes);
      for (auto& x : payload) x = static_cast<uint8_t>(rng_.Next());
      const size_t total = bytes + 16;
      const std::vector<uint8_t> pattern(total, 0x5C);
      auto* a = static_cast<uint8_t*>(dev_->Alloc(total));
      auto* b = static_cast<uint8_t*>(dev_->Alloc(total));
      dev_->CopyFromHost(a, pattern.data(), total);
      dev_->CopyFromHost(b, pattern.data(), total);
      const size_t off_b = off == 0 ? 0 : off + 2;
      dev_->CopyFromHost(a + off, payload.data(), bytes);
      dev_->Copy(b + off_b, a + off, bytes);
      std::vector<uint8_t> back(bytes + 2, 0x77);  // host side unaligned too
      dev_->Synchronize();
      dev_->CopyToHost(back.data() + 1, b + off_b, bytes);
      EXPECT_EQ(back.front(), 0x77);
      EXPECT_EQ(back.back(), 0x77);
      EXPECT_TRUE(std::equal(payload.begin(), payload.end(), back.begin() + 1));
      // Whole buffers: the payload where it was put, the pattern untouched around it.
      for (auto [buf, at] : {std::pair{a, off}, std::pair{b, off_b}}) {
        std::vector<uint8_t> all(total);
        dev_->CopyToHost(all.data(), buf, total);
        std::vector<uint8_t> expect = pattern;
        std::copy(payload.begin(), payload.end(), expect.begin() + at);
        EXPECT_TRUE(all == expect) << "device buffer differs around a copy at offset " << at;
      }
      dev_->Free(a);
      dev_->Free(b);
    }
  }
}

TEST_F(BackendParity, FillAddAxpyScale) {
  for (size_t n : kSizes) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const auto a = RandVec(rng_, n), b = RandVec(rng_, n);
    for (float value : {0.0f, -1.75f, 3.1e-5f}) {
      ExpectParity(
          [&](Backend* be, DeviceMem& m) -> Outputs {
            float* x = m.Nan(n);
            be->Fill(x, n, value);
            return {{"Fill", m.Get(x, n)}};
          },
          kExact);
    }
    // Add: separate y, y aliasing a, y aliasing b (each written).
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float *pa = m.Put(a), *pb = m.Put(b), *y = m.Nan(n);
          be->Add(y, pa, pb, n);
          float *a2 = m.Put(a), *b2 = m.Put(b);
          be->Add(a2, a2, b2, n);
          float *a3 = m.Put(a), *b3 = m.Put(b);
          be->Add(b3, a3, b3, n);
          return {{"Add y", m.Get(y, n)}, {"Add y=a", m.Get(a2, n)}, {"Add y=b", m.Get(b3, n)}};
        },
        kExact);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float* y = m.Put(b);
          be->Axpy(y, -0.75f, m.Put(a), n);
          return {{"Axpy", m.Get(y, n)}};
        },
        kElementwise);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float* x = m.Put(a);
          be->Scale(x, 0.3f, n);
          return {{"Scale", m.Get(x, n)}};
        },
        kExact);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float* y = m.Nan(n);
          be->ToFloat(y, m.Put(a), n);
          return {{"ToFloat", m.Get(y, n)}};
        },
        kExact);
  }
}

// SumSquares accumulates in double (the contract): fp32 squares of positive terms err by at
// most 2^-24 each, block-wise fp32 trees by ~log2(block) 2^-24; a plain fp32 running sum over
// 1e6 terms errs by ~1e-4 and fails rtol 1e-6.
TEST_F(BackendParity, SumSquares) {
  for (size_t n : kSizes) {
    const auto x = RandVec(rng_, n, 2.0);
    DeviceMem mr(&ref_), md(dev_);
    const double want = ref_.SumSquares(mr.Put(x), n);
    const double got = dev_->SumSquares(md.Put(x), n);
    EXPECT_NEAR(got, want, 1e-6 * want) << "n=" << n;
    if (n > 0) {
      EXPECT_GT(want, 0.0);
    }
  }
}

// The gradient norm's form: several ranges of one arena (empty ones, ranges of one element, of
// several reduction blocks, in any order) in one call. Equal to the ranges' SumSquares added in
// order, bit for bit, and again when the same ranges come back (a kept table) after others.
TEST_F(BackendParity, SumSquaresRanges) {
  const size_t n = 100003;
  const auto x = RandVec(rng_, n, 2.0);
  DeviceMem mr(&ref_), md(dev_);
  const float* xr = mr.Put(x);
  const float* xd = md.Put(x);
  using Ranges = std::vector<Backend::Range>;
  const Ranges lists[] = {{{0, n}},
                          {{5, 0}, {7, 1}, {100, 40000}, {40100, 16384}, {99000, 1003}},
                          {{99000, 1003}, {0, 3}, {16384, 16385}},
                          {{3, 0}},
                          {}};
  for (int pass = 0; pass < 2; ++pass) {
    for (const Ranges& ranges : lists) {
      SCOPED_TRACE(::testing::Message() << "pass " << pass << ", " << ranges.size() << " ranges");
      double per_range = 0.0;
      for (const Backend::Range& r : ranges) per_range += dev_->SumSquares(xd + r.offset, r.count);
      const double want = ref_.SumSquaresRanges(xr, ranges);
      const double got = dev_->SumSquaresRanges(xd, ranges);
      EXPECT_EQ(got, per_range);
      EXPECT_NEAR(got, want, 1e-6 * want);
      size_t count = 0;
      for (const Backend::Range& r : ranges) count += r.count;
      if (count > 0) {
        EXPECT_GT(want, 0.0);
      } else {
        EXPECT_EQ(got, 0.0);
      }
    }
  }
}

TEST_F(BackendParity, Embedding) {
  for (int vocab : {11, 1000}) {
    for (int n : {1, 7, 64}) {
      for (int c : {8, 33, 256}) {
        SCOPED_TRACE(::testing::Message() << "vocab=" << vocab << " n=" << n << " c=" << c);
        // Half the ids come from the first 3 rows, so rows repeat and the backward must add
        // several tokens into one row; the last row is used (bounds).
        std::vector<int32_t> ids = Ids(n, vocab);
        for (int i = 1; i < n; i += 2) ids[i] = static_cast<int32_t>(rng_.Below(3));
        ids[0] = vocab - 1;
        const auto table = RandVec(rng_, static_cast<size_t>(vocab) * c);
        const auto dout = RandVec(rng_, static_cast<size_t>(n) * c);
        const auto dtable0 = RandVec(rng_, table.size());
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* out = m.Nan(static_cast<size_t>(n) * c);
              be->EmbeddingForward(out, m.Put(ids), m.Put(table), n, c);
              return {{"out", m.Get(out, static_cast<size_t>(n) * c)}};
            },
            kExact);
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* out = m.Put(dout);  // added to
              be->EmbeddingAdd(out, m.Put(ids), m.Put(table), n, c);
              return {{"out +=", m.Get(out, static_cast<size_t>(n) * c)}};
            },
            kExact);
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* dtable = m.Put(dtable0);
              be->EmbeddingBackward(dtable, m.Put(ids), m.Put(dout), n, c);
              return {{"dtable", m.Get(dtable, dtable0.size())}};
            },
            kExact);  // token order, fp32, on every backend
      }
    }
  }
}

TEST_F(BackendParity, EmbeddingRange) {
  const int vocab = 11;
  for (int n : {1, 7, 64}) {
    for (int c : {8, 33, 256}) {
      for (auto [start, rows] : {std::pair{0, 4}, std::pair{4, 5}, std::pair{9, 2}}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " c=" << c << " rows [" << start << ", "
                                          << start + rows << ")");
        std::vector<int32_t> ids = Ids(n, vocab);  // inside and outside the range, repeated
        ids[0] = start + rows - 1;                 // last row of the range
        if (n > 1) ids[1] = start + rows < vocab ? start + rows : 0;  // just outside
        const auto table = RandVec(rng_, static_cast<size_t>(rows) * c);
        const auto dout = RandVec(rng_, static_cast<size_t>(n) * c);
        const auto dtable0 = RandVec(rng_, table.size());
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* out = m.Nan(static_cast<size_t>(n) * c);
              be->EmbeddingForwardRange(out, m.Put(ids), m.Put(table), n, c, start, rows);
              return {{"out", m.Get(out, static_cast<size_t>(n) * c)}};
            },
            kExact);
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float* dtable = m.Put(dtable0);
              be->EmbeddingBackwardRange(dtable, m.Put(ids), m.Put(dout), n, c, start, rows);
              return {{"dtable", m.Get(dtable, dtable0.size())}};
            },
            kExact);  // token order, fp32, on every backend
      }
    }
  }
}

// The embedding gradient over many tokens and over more columns than one CUDA block covers (256):
// rows repeat hundreds of times (CUDA sorts the tokens by row and adds each row's run in token
// order, four loads at a time: runs of every length modulo 4), one id appears only near the end
// (the last run), and for the range versions most ids, token 0's included, are out of range
// (sorted after every row). The sums are the CPU's bits.
TEST_F(BackendParity, EmbeddingBackwardManyTokens) {
  const int vocab = 8;
  for (auto [n, c] : {std::pair{1100, 24}, std::pair{40, 1030}}) {
    std::vector<int32_t> ids = Ids(n, 5);                // ids 0 .. 4 throughout
    ids[0] = 5;                                          // id 5 once, at token 0
    for (int t = n - n / 16; t < n; t += 3) ids[t] = 7;  // id 7 only at the end; 6 never
    const auto dout = RandVec(rng_, static_cast<size_t>(n) * c);
    for (auto [start, rows] : {std::pair{0, vocab}, std::pair{1, 3}, std::pair{6, 2}}) {
      SCOPED_TRACE(::testing::Message()
                   << "n=" << n << " c=" << c << " rows [" << start << ", " << start + rows << ")");
      const auto dtable0 = RandVec(rng_, static_cast<size_t>(rows) * c);
      ExpectParity(
          [&](Backend* be, DeviceMem& m) -> Outputs {
            float* dtable = m.Put(dtable0);
            if (rows == vocab) {
              be->EmbeddingBackward(dtable, m.Put(ids), m.Put(dout), n, c);
            } else {
              be->EmbeddingBackwardRange(dtable, m.Put(ids), m.Put(dout), n, c, start, rows);
            }
            return {{"dtable", m.Get(dtable, dtable0.size())}};
          },
          kExact);  // token order, fp32, on every backend
    }
  }
}

// Linear shapes: n x in_dim -> out_dim, none a multiple of the usual 32/128 tiles but 256.
struct LinearShape {
  int in, out;
};
const LinearShape kLinearShapes[] = {{8, 11}, {33, 1000}, {256, 33}};

TEST_F(BackendParity, Linear) {
  for (int n : {1, 7, 64}) {
    for (const LinearShape& s : kLinearShapes) {
      const auto x = RandVec(rng_, static_cast<size_t>(n) * s.in);
      const auto w = RandVec(rng_, static_cast<size_t>(s.out) * s.in, 0.2);
      const auto bias = RandVec(rng_, s.out);
      const auto out0 = RandVec(rng_, static_cast<size_t>(n) * s.out);
      for (bool has_bias : {false, true}) {
        for (bool acc : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "n=" << n << " in=" << s.in << " out=" << s.out
                                            << " bias=" << has_bias << " accumulate=" << acc);
          ExpectParity(
              [&](Backend* be, DeviceMem& m) -> Outputs {
                float* out = acc ? m.Put(out0) : m.Nan(out0.size());
                be->Linear(out, m.Put(x), m.Put(w), has_bias ? m.Put(bias) : nullptr, n, s.in,
                           s.out, acc);
                return {{"out", m.Get(out, out0.size())}};
              },
              kGemm);
        }
      }
    }
  }
}

// out = residual + x w^T + bias, into a separate (poisoned) output or in place over the residual.
TEST_F(BackendParity, LinearResidual) {
  for (int n : {1, 7, 64}) {
    for (const LinearShape& s : kLinearShapes) {
      const auto x = RandVec(rng_, static_cast<size_t>(n) * s.in);
      const auto w = RandVec(rng_, static_cast<size_t>(s.out) * s.in, 0.2);
      const auto bias = RandVec(rng_, s.out);
      const auto res = RandVec(rng_, static_cast<size_t>(n) * s.out);
      for (bool has_bias : {false, true}) {
        for (bool in_place : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "n=" << n << " in=" << s.in << " out=" << s.out
                                            << " bias=" << has_bias << " in_place=" << in_place);
          ExpectParity(
              [&](Backend* be, DeviceMem& m) -> Outputs {
                float* r = m.Put(res);
                float* out = in_place ? r : m.Nan(res.size());
                be->LinearResidual(out, r, m.Put(x), m.Put(w), has_bias ? m.Put(bias) : nullptr, n,
                                   s.in, s.out);
                Outputs o = {{"out", m.Get(out, res.size())}};
                if (!in_place) o.emplace_back("residual (unchanged)", m.Get(r, res.size()));
                return o;
              },
              kGemm);
        }
      }
    }
  }
}

TEST_F(BackendParity, LinearBackward) {
  // 601 and 2,000 rows: the bias gradient's column sums split the rows into 2 and 7 slices, the
  // last one shorter (block_reduce.cuh); 2,000 on the narrowest shape only.
  for (int n : {1, 7, 64, 150, 601, 2000}) {
    for (const LinearShape& s : kLinearShapes) {
      if (n > 601 && s.in * s.out > 100) continue;
      const size_t nin = static_cast<size_t>(n) * s.in, nw = static_cast<size_t>(s.out) * s.in;
      const auto x = RandVec(rng_, nin), w = RandVec(rng_, nw, 0.2);
      const auto dout = RandVec(rng_, static_cast<size_t>(n) * s.out);
      const auto din0 = RandVec(rng_, nin), dw0 = RandVec(rng_, nw), db0 = RandVec(rng_, s.out);
      for (int present = 0; present < 8; ++present) {  // bits: din, dw, dbias non-null
        for (bool acc : {false, true}) {
          const bool has_din = present & 1, has_dw = present & 2, has_db = present & 4;
          SCOPED_TRACE(::testing::Message()
                       << "n=" << n << " in=" << s.in << " out=" << s.out << " din=" << has_din
                       << " dw=" << has_dw << " dbias=" << has_db << " accumulate_din=" << acc);
          ExpectParity(
              [&](Backend* be, DeviceMem& m) -> Outputs {
                float* din = has_din ? (acc ? m.Put(din0) : m.Nan(nin)) : nullptr;
                float* dw = has_dw ? m.Put(dw0) : nullptr;
                float* db = has_db ? m.Put(db0) : nullptr;
                be->LinearBackward(din, dw, db, m.Put(dout), m.Put(x), m.Put(w), n, s.in, s.out,
                                   acc);
                Outputs o;
                if (din) o.emplace_back("din", m.Get(din, nin));
                if (dw) o.emplace_back("dw", m.Get(dw, nw));
                if (db) o.emplace_back("dbias", m.Get(db, db0.size()));
                return o;
              },
              kGemm);
        }
      }
    }
  }
}

TEST_F(BackendParity, LayerNormAndRmsNorm) {
  const float eps = 1e-5f;
  // CUDA's backward: rows of 128 to 1,024 column groups for RMSNorm, 128 to 512 for LayerNorm
  // (4 columns each where c % 4 == 0: 516 and 2,052 columns; 1 a thread: 257) in one pass, each
  // block a run of rows (601 rows: 201 runs of 3, the last of 1) whose column sums are added in
  // a tree; other rows (8, 33, 256 and 1,030 columns; 2,052 for LayerNorm; 4,100) a row a block,
  // then the column sums, whose 601 rows split into 2 slices, the second one shorter
  // (block_reduce.cuh). 4,100 columns also take the forward's looping row kernel.
  for (int n : {1, 7, 64, 150, 601}) {
    for (int c : {8, 33, 256, 257, 516, 1030, 2052, 4100}) {
      if ((c > 1000 && n != 7 && n != 601) || (c == 4100 && n != 7)) continue;
      SCOPED_TRACE(::testing::Message() << "n=" << n << " c=" << c);
      const size_t nc = static_cast<size_t>(n) * c;
      auto x = RandVec(rng_, nc, 2.0);
      for (float& v : x) v += 1.0f;  // a non-zero mean
      auto g = RandVec(rng_, c, 0.2);
      for (float& v : g) v += 1.0f;
      const auto b = RandVec(rng_, c), dout = RandVec(rng_, nc);
      const auto dx0 = RandVec(rng_, nc), dg0 = RandVec(rng_, c), db0 = RandVec(rng_, c);
      const auto dres0 = RandVec(rng_, nc);
      for (bool has_b : {false, true}) {
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              float *out = m.Nan(nc), *mean = m.Nan(n), *rstd = m.Nan(n);
              be->LayerNormForward(out, mean, rstd, m.Put(x), m.Put(g), has_b ? m.Put(b) : nullptr,
                                   n, c, eps);
              return {{"LayerNorm out", m.Get(out, nc)},
                      {"mean", m.Get(mean, n)},
                      {"rstd", m.Get(rstd, n)}};
            },
            kReduction);
      }
      // The backward gets the CPU's saved statistics on both backends.
      std::vector<float> y(nc), mean(n), rstd(n);
      ref_.LayerNormForward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), n, c,
                            eps);
      // dres: 0 none (dx written; poisoned first), 1 aliasing dx (accumulates), 2 separate.
      auto dx_and_dres = [&](DeviceMem& m, int dres_mode) -> std::pair<float*, const float*> {
        if (dres_mode == 1) {
          float* dx = m.Put(dx0);
          return {dx, dx};
        }
        return {m.Nan(nc), dres_mode == 2 ? m.Put(dres0) : nullptr};
      };
      for (int dres_mode = 0; dres_mode < 3; ++dres_mode) {
        for (bool has_db : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "dres mode " << dres_mode << " db " << has_db);
          ExpectParity(
              [&](Backend* be, DeviceMem& m) -> Outputs {
                auto [dx, dres] = dx_and_dres(m, dres_mode);
                float *dg = m.Put(dg0), *db = has_db ? m.Put(db0) : nullptr;
                be->LayerNormBackward(dx, dres, dg, db, m.Put(dout), m.Put(x), m.Put(g),
                                      m.Put(mean), m.Put(rstd), n, c);
                Outputs o = {{"LayerNorm dx", m.Get(dx, nc)}, {"dg", m.Get(dg, c)}};
                if (db) o.emplace_back("db", m.Get(db, c));
                return o;
              },
              kReduction);
        }
      }
      ExpectParity(
          [&](Backend* be, DeviceMem& m) -> Outputs {
            float *out = m.Nan(nc), *rs = m.Nan(n);
            be->RmsNormForward(out, rs, m.Put(x), m.Put(g), n, c, eps);
            return {{"RmsNorm out", m.Get(out, nc)}, {"rstd", m.Get(rs, n)}};
          },
          kReduction);
      ref_.RmsNormForward(y.data(), rstd.data(), x.data(), g.data(), n, c, eps);
      for (int dres_mode = 0; dres_mode < 3; ++dres_mode) {
        SCOPED_TRACE(::testing::Message() << "dres mode " << dres_mode);
        ExpectParity(
            [&](Backend* be, DeviceMem& m) -> Outputs {
              auto [dx, dres] = dx_and_dres(m, dres_mode);
              float* dg = m.Put(dg0);
              be->RmsNormBackward(dx, dres, dg, m.Put(dout), m.Put(x), m.Put(g), m.Put(rstd), n, c);
              return {{"RmsNorm dx", m.Get(dx, nc)}, {"dg", m.Get(dg, c)}};
            },
            kReduction);
      }
    }
  }
}

TEST_F(BackendParity, GeluAndSwiGlu) {
  for (size_t n : kSizes) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    // Scale 3: the tails (tanh and sigmoid saturated) as well as the middle.
    const auto x = RandVec(rng_, n, 3.0), up = RandVec(rng_, n), dout = RandVec(rng_, n);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float *out = m.Nan(n), *dx = m.Nan(n), *px = m.Put(x), *dy = m.Put(dout);
          be->GeluForward(out, px, n);
          be->GeluBackward(dx, dy, px, n);
          be->GeluBackward(dy, dy, px, n);  // dx aliasing dout
          return {{"Gelu out", m.Get(out, n)}, {"dx", m.Get(dx, n)}, {"dx=dout", m.Get(dy, n)}};
        },
        kElementwise);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float *out = m.Nan(n), *dgate = m.Nan(n), *dup = m.Nan(n), *gate = m.Put(x);
          float* pup = m.Put(up);
          const int cols = static_cast<int>(n);
          be->SwiGluForward(out, gate, pup, 1, cols, cols);
          be->SwiGluBackward(dgate, dup, m.Put(dout), gate, pup, 1, cols, cols);
          return {
              {"SwiGlu out", m.Get(out, n)}, {"dgate", m.Get(dgate, n)}, {"dup", m.Get(dup, n)}};
        },
        kElementwise);
  }
}

// SwiGLU on the halves of one [rows, 2 cols] GEMM output (and its gradient), as the MLP runs it,
// rows `stride` >= 2 cols apart: with columns that are a multiple of 8 (16-byte accesses) and
// not, and padding after each row (a sentinel, 7) that neither pass may write.
TEST_F(BackendParity, SwiGluOnStridedHalves) {
  struct Case {
    int rows, cols, pad;
  };
  for (const Case& k : {Case{1, 1, 0}, Case{3, 5, 3}, Case{7, 24, 0}, Case{5, 40, 8},
                        Case{300, 1000, 0}, Case{9, 1003, 2}}) {
    SCOPED_TRACE(::testing::Message()
                 << "rows=" << k.rows << " cols=" << k.cols << " pad=" << k.pad);
    const int stride = 2 * k.cols + k.pad;
    const size_t n = static_cast<size_t>(k.rows) * k.cols, total = size_t{1} * k.rows * stride;
    std::vector<float> gu = RandVec(rng_, total, 3.0), grads(total, 0.0f);
    for (int r = 0; r < k.rows; ++r) {
      for (int j = 2 * k.cols; j < stride; ++j) gu[size_t{1} * r * stride + j] = 7.0f;
      for (int j = 0; j < 2 * k.cols; ++j) grads[size_t{1} * r * stride + j] = NAN;
      for (int j = 2 * k.cols; j < stride; ++j) grads[size_t{1} * r * stride + j] = 7.0f;
    }
    const auto dout = RandVec(rng_, n);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float *out = m.Nan(n), *pgu = m.Put(gu), *pd = m.Put(grads), *dy = m.Put(dout);
          be->SwiGluForward(out, pgu, pgu + k.cols, k.rows, k.cols, stride);
          be->SwiGluBackward(pd, pd + k.cols, dy, pgu, pgu + k.cols, k.rows, k.cols, stride);
          Outputs r = {{"SwiGlu out", m.Get(out, n)}, {"dgate, dup", m.Get(pd, total)}};
          // In place, as the fused gradient may be: dgate, dup over gate, up.
          be->SwiGluBackward(pgu, pgu + k.cols, dy, pgu, pgu + k.cols, k.rows, k.cols, stride);
          r.push_back({"in place", m.Get(pgu, total)});
          return r;
        },
        kElementwise);
    // The CPU oracle itself: the strided rows give the dense form's values, and the padding stays.
    std::vector<float> gate(n), up(n), out(n), dgate(n), dup(n), strided_out(n);
    for (int r = 0; r < k.rows; ++r) {
      for (int j = 0; j < k.cols; ++j) {
        gate[size_t{1} * r * k.cols + j] = gu[size_t{1} * r * stride + j];
        up[size_t{1} * r * k.cols + j] = gu[size_t{1} * r * stride + k.cols + j];
      }
    }
    const int all = static_cast<int>(n);
    ref_.SwiGluForward(out.data(), gate.data(), up.data(), 1, all, all);
    ref_.SwiGluBackward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), 1, all, all);
    ref_.SwiGluForward(strided_out.data(), gu.data(), gu.data() + k.cols, k.rows, k.cols, stride);
    EXPECT_EQ(strided_out, out);
    ref_.SwiGluBackward(grads.data(), grads.data() + k.cols, dout.data(), gu.data(),
                        gu.data() + k.cols, k.rows, k.cols, stride);
    for (int r = 0; r < k.rows; ++r) {
      for (int j = 0; j < stride; ++j) {
        const float got = grads[size_t{1} * r * stride + j];
        const size_t at = size_t{1} * r * k.cols + j % k.cols;
        const float want = j < k.cols ? dgate[at] : j < 2 * k.cols ? dup[at] : 7.0f;
        ASSERT_EQ(got, want) << "row " << r << " column " << j;
      }
    }
  }
}

// Hidden dropout: the same mask on every backend (engine/core/dropout.h), with and without a
// residual, in place, and at row offsets past 2^32 elements.
TEST_F(BackendParity, DropoutAddAndBackward) {
  struct Case {
    int n, c;
    float p;
    int64_t row0;
  };
  for (const Case& k : {Case{1, 8, 0.1f, 0}, Case{7, 33, 0.5f, 12345},
                        Case{64, 96, 0.1f, int64_t{3} << 30}, Case{5, 200, 0.9f, 7}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << k.n << " c=" << k.c << " p=" << k.p);
    const size_t nc = static_cast<size_t>(k.n) * k.c;
    const auto x = RandVec(rng_, nc), branch = RandVec(rng_, nc), dout = RandVec(rng_, nc);
    ExpectParity(
        [&](Backend* be, DeviceMem& m) -> Outputs {
          float *out = m.Nan(nc), *alone = m.Nan(nc), *db = m.Nan(nc), *pb = m.Put(branch);
          float* dy = m.Put(dout);
          be->DropoutAdd(out, m.Put(x), pb, k.n, k.c, k.p, 0xabcdef, k.row0);
          be->DropoutAdd(alone, nullptr, pb, k.n, k.c, k.p, 0xabcdef, k.row0);
          be->DropoutBackward(db, dy, k.n, k.c, k.p, 0xabcdef, k.row0);
          be->DropoutBackward(dy, dy, k.n, k.c, k.p, 0xabcdef, k.row0);  // in place
          return {{"out", m.Get(out, nc)},
                  {"alone", m.Get(alone, nc)},
                  {"dbranch", m.Get(db, nc)},
                  {"in place", m.Get(dy, nc)}};
        },
        kElementwise);
  }
}

TEST_F(BackendParity, Rope) {
  struct Case {
    int n, heads, head_dim, first_pos;
    RopeParams rope;
  };
  // Llama 3.1's scaling (every band of its 64 pairs), and linear.
  const RopeParams llama3{5e5f, {RopeScalingKind::kLlama3, 8.0f, 1.0f, 4.0f, 8192}};
  const RopeParams linear{1e4f, {RopeScalingKind::kLinear, 4.0f}};
  // first_pos < 0: random positions in [0, 1040), not in order.
  for (const Case& k :
       {Case{1, 1, 8, 37, {1e4f}}, Case{7, 3, 64, 37, {1e4f}}, Case{33, 2, 10, 1000, {1e4f}},
        Case{5, 4, 128, 1020, {5e5f}}, Case{64, 2, 16, -1, {1e4f}}, Case{9, 2, 128, 5000, llama3},
        Case{64, 2, 128, -1, llama3}, Case{6, 3, 16, 700, linear}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << k.n << " heads=" << k.heads
                                      << " head_dim=" << k.head_dim << " pos0=" << k.first_pos);
    std::vector<int32_t> pos(k.n);
    for (int t = 0; t < k.n; ++t) {
      pos[t] = k.first_pos >= 0 ? k.first_pos + t : static_cast<int32_t>(rng_.Below(1040));
    }
    // Dense rows, and rows with more after the heads (the v part of a fused q, k, v row: twice
    // the heads; 3 elements: no 16-byte accesses), which neither pass may change.
    const int cols = k.heads * k.head_dim;
    for (int stride : {cols, cols + 2 * k.head_dim, cols + 3}) {
      SCOPED_TRACE(::testing::Message() << "stride=" << stride);
      const size_t size = static_cast<size_t>(k.n) * stride;
      const auto x = RandVec(rng_, size), dy = RandVec(rng_, size);
      ExpectParity(
          [&](Backend* be, DeviceMem& m) -> Outputs {
            float *px = m.Put(x), *pd = m.Put(dy);
            const int32_t* pp = m.Put(pos);
            be->RopeForward(px, pp, k.n, k.heads, k.head_dim, stride, k.rope);
            be->RopeBackward(pd, pp, k.n, k.heads, k.head_dim, stride, k.rope);
            return {{"Rope x", m.Get(px, size)}, {"dx", m.Get(pd, size)}};
          },
          kRope);
      // The oracle: each row as its own dense call, the rest of the row untouched.
      std::vector<float> got = x;
      ref_.RopeForward(got.data(), pos.data(), k.n, k.heads, k.head_dim, stride, k.rope);
      for (int t = 0; t < k.n; ++t) {
        std::vector<float> row(x.begin() + size_t{1} * t * stride,
                               x.begin() + size_t{1} * (t + 1) * stride);
        ref_.RopeForward(row.data(), pos.data() + t, 1, k.heads, k.head_dim, cols, k.rope);
        ASSERT_TRUE(std::equal(row.begin(), row.end(), got.begin() + size_t{1} * t * stride))
            << "row " << t;
      }
    }
  }
}

TEST_F(BackendParity, AdamW) {
  for (size_t n : {size_t{1}, size_t{7}, size_t{1000}, size_t{1000003}}) {
    for (auto [step, wd] : {std::pair{1, 0.1f}, std::pair{10, 0.0f}, std::pair{1000, 0.1f}}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " step=" << step << " wd=" << wd);
      const auto p0 = RandVec(rng_, n), g = RandVec(rng_, n, 0.1);
      const auto m0 = RandVec(rng_, n, 0.05), v0 = UniformVec(rng_, n, 1e-4, 1e-2);
      ExpectParity(
          [&](Backend* be, DeviceMem& m) -> Outputs {
            float *p = m.Put(p0), *pm = m.Put(m0), *pv = m.Put(v0);
            // lr 0.1: the update is a sizeable part of p, so its error shows in p.
            be->AdamW(p, m.Put(g), pm, pv, n, 0.1f, 0.9f, 0.95f, 1e-8f, wd, step);
            std::vector<float> p1 = m.Get(p, n), update(n);
            for (size_t i = 0; i < n; ++i) update[i] = p1[i] - p0[i];
            return {{"p", p1}, {"p - p0", update}, {"m", m.Get(pm, n)}, {"v", m.Get(pv, n)}};
          },
          kElementwise);
    }
  }
}

// AdamW over several runs of one arena in one call (one launch on CUDA), with and without weight
// decay, gaps between runs left as they are; called again with the same runs (CUDA keeps their
// table) and with other runs (uploaded anew): as AdamW run by run (the CPU's default).
TEST_F(BackendParity, AdamWRuns) {
  const size_t n = 5000;
  using Run = Backend::AdamWRun;
  const std::vector<Run> runs = {
      {0, 1000, true}, {1000, 7, false}, {1100, 2500, true}, {3700, 1, false}, {3800, 1200, false}};
  const std::vector<Run> other = {{5, 3000, false}, {3005, 1995, true}};
  const auto p0 = RandVec(rng_, n), g = RandVec(rng_, n, 0.1);
  const auto m0 = RandVec(rng_, n, 0.05), v0 = UniformVec(rng_, n, 1e-4, 1e-2);
  ExpectParity(
      [&](Backend* be, DeviceMem& m) -> Outputs {
        float *p = m.Put(p0), *pg = m.Put(g), *pm = m.Put(m0), *pv = m.Put(v0);
        be->AdamWRuns(p, pg, pm, pv, runs, 0.1f, 0.9f, 0.95f, 1e-8f, 0.1f, 3);
        const std::vector<float> p1 = m.Get(p, n);
        be->AdamWRuns(p, pg, pm, pv, runs, 0.1f, 0.9f, 0.95f, 1e-8f, 0.1f, 4);
        const std::vector<float> p2 = m.Get(p, n);
        be->AdamWRuns(p, pg, pm, pv, other, 0.05f, 0.9f, 0.95f, 1e-8f, 0.2f, 5);
        return {{"p after one call", p1},
                {"p after the same runs again", p2},
                {"p after other runs", m.Get(p, n)},
                {"m", m.Get(pm, n)},
                {"v", m.Get(pv, n)}};
      },
      kElementwise);
}

}  // namespace
}  // namespace eellm::parity
