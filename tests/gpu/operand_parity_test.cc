// Parity of the ops that take or produce bf16 operands (engine/tensor/operand.h), on a
// backend whose operand_dtype() is bf16 (cuda-bf16w; the test skips on the others): the
// backend under test gets bf16 operands, the CPU the same values in fp32 (inputs rounded to
// bf16 on the host first), and the results must agree within the bf16 tolerances. Outputs start
// as NaN, so every element must be written; no write may pass a buffer's end.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/bf16_reference_backend.h"
#include "tests/gpu/device_mem.h"
#include "tests/gpu/parity_backend.h"
#include "tests/gpu/parity_tolerances.h"

namespace eellm {
namespace {

using cpu_test::InRows;
using cpu_test::OutOfRows;
using cpu_test::RandVec;
using testing::Close;
using testing::DeviceMem;
using testing::kGemmBf16;
using testing::RoundedToBf16;
using testing::SameRoundingsButRareFlips;
using testing::Tol;

// A bf16 store rounds to 8 significant bits: 2^-9 relative, plus fp32 differences before it.
constexpr Tol kBf16Store{4e-3, 1e-6};
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class OperandParity : public testing::DeviceParityTest {
 protected:
  void SetUp() override {
    DeviceParityTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    if (dev_->operand_dtype() != DType::kBF16) {
      GTEST_SKIP() << dev_->name() << " keeps fp32 operands";
    }
  }
  CpuBackend cpu_;
  Rng rng_{7};
};

TEST_F(OperandParity, LinearReadsBf16Input) {
  const int n = 37, in = 48, out = 40;
  const auto x = RoundedToBf16(RandVec(rng_, n * in));
  const auto w = RandVec(rng_, out * in, 0.2);
  const auto bias = RandVec(rng_, out);
  const auto dout = RandVec(rng_, n * out);
  const auto dw0 = RandVec(rng_, out * in), db0 = RandVec(rng_, out);
  DeviceMem c(&cpu_), d(dev_);
  // Forward.
  float* y_c = c.Put(std::vector<float>(n * out, kNaN));
  float* y_d = d.Put(std::vector<float>(n * out, kNaN));
  cpu_.Linear(y_c, c.Put(x), c.Put(w), c.Put(bias), n, in, out, false);
  dev_->Linear(y_d, d.PutBf16(x), d.Put(w), d.Put(bias), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(y_d, n * out), c.Get(y_c, n * out), kGemmBf16)) << "out";
  // Into the residual stream: out = residual + x w^T + bias, out separate (poisoned) or in place.
  const auto res = RandVec(rng_, n * out);
  for (bool in_place : {false, true}) {
    float* r_c = c.Put(res);
    float* r_d = d.Put(res);
    float* o_c = in_place ? r_c : c.Put(std::vector<float>(n * out, kNaN));
    float* o_d = in_place ? r_d : d.Put(std::vector<float>(n * out, kNaN));
    cpu_.LinearResidual(o_c, r_c, c.Put(x), c.Put(w), c.Put(bias), n, in, out);
    dev_->LinearResidual(o_d, r_d, d.PutBf16(x), d.Put(w), d.Put(bias), n, in, out);
    EXPECT_TRUE(Close(d.Get(o_d, n * out), c.Get(o_c, n * out), kGemmBf16))
        << "residual out, in place " << in_place;
    if (!in_place) EXPECT_EQ(d.Get(r_d, n * out), res) << "the residual is an input";
  }
  // Backward: din written, dw and dbias accumulated.
  float* din_c = c.Put(std::vector<float>(n * in, kNaN));
  float* din_d = d.Put(std::vector<float>(n * in, kNaN));
  float *dw_c = c.Put(dw0), *dw_d = d.Put(dw0), *db_c = c.Put(db0), *db_d = d.Put(db0);
  cpu_.LinearBackward(din_c, dw_c, nullptr, c.Put(dout), c.Put(x), c.Put(w), n, in, out, false);
  // The bias gradient sums dout as the GEMMs read it, converted to bf16 (on cuda-bf16w the
  // weight-gradient GEMM's epilogue computes it from its operand).
  cpu_.LinearBackward(nullptr, nullptr, db_c, c.Put(RoundedToBf16(dout)), c.Put(x), c.Put(w), n, in,
                      out, false);
  dev_->LinearBackward(din_d, dw_d, db_d, d.Put(dout), d.PutBf16(x), d.Put(w), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(din_d, n * in), c.Get(din_c, n * in), kGemmBf16)) << "din";
  EXPECT_TRUE(Close(d.Get(dw_d, out * in), c.Get(dw_c, out * in), kGemmBf16)) << "dw";
  EXPECT_TRUE(Close(d.Get(db_d, out), c.Get(db_c, out), testing::kReduction)) << "dbias";
  EXPECT_TRUE(d.GuardsIntact());
}

// GEMM outputs in bf16 (q, k, v): the product and the bias rounded once (the bias added in the
// GEMM's epilogue); RoPE in place on bf16.
TEST_F(OperandParity, LinearAndRopeWriteBf16) {
  const int n = 21, in = 40, out = 48, heads = 3, hd = 16;
  const auto x = RoundedToBf16(RandVec(rng_, n * in));
  const auto w = RandVec(rng_, out * in, 0.2);
  const auto bias = RandVec(rng_, out);
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = 3 * i + 1;
  DeviceMem c(&cpu_), d(dev_);
  float* y_c = c.Put(std::vector<float>(n * out, kNaN));
  Operand y_d = d.PutBf16(std::vector<float>(n * out, kNaN));
  cpu_.Linear(y_c, c.Put(x), c.Put(w), c.Put(bias), n, in, out, false);
  dev_->Linear(y_d, d.PutBf16(x), d.Put(w), d.Put(bias), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(y_d, n * out), c.Get(y_c, n * out), kGemmBf16)) << "out";
  // RoPE on the (rounded) result, heads x head_dim = out.
  const auto y = RoundedToBf16(d.Get(y_d, n * out));
  float* r_c = c.Put(y);
  Operand r_d = d.PutBf16(y);
  cpu_.RopeForward(r_c, c.Put(pos), n, heads, hd, heads * hd, RopeParams{10000.0f});
  dev_->RopeForward(r_d, d.Put(pos), n, heads, hd, heads * hd, RopeParams{10000.0f});
  EXPECT_TRUE(Close(d.Get(r_d, n * out), c.Get(r_c, n * out), Tol{4e-3, 1e-4})) << "RoPE";
  EXPECT_TRUE(d.GuardsIntact());
}

// ToFloat widens a bf16 operand exactly, every element written.
TEST_F(OperandParity, ToFloatWidensBf16) {
  DeviceMem d(dev_);
  const size_t n = 1000;
  const auto x = RoundedToBf16(RandVec(rng_, n, 3.0));
  float* y = d.Nan(n);
  dev_->ToFloat(y, d.PutBf16(x), n);
  EXPECT_EQ(d.Get(y, n), x);
  EXPECT_TRUE(d.GuardsIntact());
}

TEST_F(OperandParity, NormsAndActivationsWriteBf16) {
  const int n = 19, ch = 72;
  const size_t nc = static_cast<size_t>(n) * ch;
  const auto x = RandVec(rng_, nc, 2.0);
  const auto up = RandVec(rng_, nc);
  const auto g = RandVec(rng_, ch), b = RandVec(rng_, ch);
  DeviceMem c(&cpu_), d(dev_);
  const std::vector<float> nan(nc, kNaN), nan_rows(n, kNaN);
  {
    float *out_c = c.Put(nan), *mean_c = c.Put(nan_rows), *rstd_c = c.Put(nan_rows);
    Operand out_d = d.PutBf16(nan);
    float *mean_d = d.Put(nan_rows), *rstd_d = d.Put(nan_rows);
    cpu_.LayerNormForward(out_c, mean_c, rstd_c, c.Put(x), c.Put(g), c.Put(b), n, ch, 1e-5f);
    dev_->LayerNormForward(out_d, mean_d, rstd_d, d.Put(x), d.Put(g), d.Put(b), n, ch, 1e-5f);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "LayerNorm out";
    EXPECT_TRUE(Close(d.Get(rstd_d, n), c.Get(rstd_c, n), testing::kReduction)) << "rstd";
  }
  {
    float *out_c = c.Put(nan), *rstd_c = c.Put(nan_rows);
    Operand out_d = d.PutBf16(nan);
    float* rstd_d = d.Put(nan_rows);
    cpu_.RmsNormForward(out_c, rstd_c, c.Put(x), c.Put(g), n, ch, 1e-5f);
    dev_->RmsNormForward(out_d, rstd_d, d.Put(x), d.Put(g), n, ch, 1e-5f);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "RmsNorm out";
  }
  {
    float* out_c = c.Put(nan);
    Operand out_d = d.PutBf16(nan);
    cpu_.GeluForward(out_c, c.Put(x), nc);
    dev_->GeluForward(out_d, d.Put(x), nc);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "GELU out";
  }
  {
    float* out_c = c.Put(nan);
    Operand out_d = d.PutBf16(nan);
    cpu_.SwiGluForward(out_c, c.Put(x), c.Put(up), n, ch, ch);
    dev_->SwiGluForward(out_d, d.Put(x), d.Put(up), n, ch, ch);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "SwiGLU out";
  }
  EXPECT_TRUE(d.GuardsIntact());
}

// The backward of a GEMM whose output gradient is bf16 (written by an activation's or attention's
// backward): din written as bf16 (or added to fp32), dw and dbias accumulated in fp32.
TEST_F(OperandParity, LinearBackwardReadsAndWritesBf16Gradients) {
  const int n = 33, in = 40, out = 56;
  const auto x = RoundedToBf16(RandVec(rng_, n * in));
  const auto w = RandVec(rng_, out * in, 0.2);
  const auto dout = RoundedToBf16(RandVec(rng_, n * out));
  const auto dw0 = RandVec(rng_, out * in), db0 = RandVec(rng_, out), din0 = RandVec(rng_, n * in);
  DeviceMem c(&cpu_), d(dev_);
  const ConstOperand x_d = d.PutBf16(x), dout_d = d.PutBf16(dout);
  {  // bf16 din, written.
    float* din_c = c.Put(std::vector<float>(n * in, kNaN));
    Operand din_d = d.PutBf16(std::vector<float>(n * in, kNaN));
    float *dw_c = c.Put(dw0), *dw_d = d.Put(dw0), *db_c = c.Put(db0), *db_d = d.Put(db0);
    cpu_.LinearBackward(din_c, dw_c, db_c, c.Put(dout), c.Put(x), c.Put(w), n, in, out, false);
    dev_->LinearBackward(din_d, dw_d, db_d, dout_d, x_d, d.Put(w), n, in, out, false);
    EXPECT_TRUE(Close(d.Get(din_d, n * in), c.Get(din_c, n * in), kGemmBf16)) << "din";
    EXPECT_TRUE(Close(d.Get(dw_d, out * in), c.Get(dw_c, out * in), kGemmBf16)) << "dw";
    EXPECT_TRUE(Close(d.Get(db_d, out), c.Get(db_c, out), testing::kReduction)) << "dbias";
  }
  {  // fp32 din, accumulated (the norm input's gradient, summed over q, k, v).
    float *din_c = c.Put(din0), *din_d = d.Put(din0);
    cpu_.LinearBackward(din_c, nullptr, nullptr, c.Put(dout), c.Put(x), c.Put(w), n, in, out, true);
    dev_->LinearBackward(din_d, nullptr, nullptr, dout_d, x_d, d.Put(w), n, in, out, true);
    EXPECT_TRUE(Close(d.Get(din_d, n * in), c.Get(din_c, n * in), kGemmBf16)) << "din +=";
  }
  EXPECT_TRUE(d.GuardsIntact());
}

// The share of elements of `got` equal to `want` (bit for bit as floats).
double ShareEqual(const std::vector<float>& got, const std::vector<float>& want) {
  size_t same = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) same += got[i] == want[i];
  return got.empty() ? 1.0 : static_cast<double>(same) / static_cast<double>(got.size());
}

// The number of distinct bf16 values of `key` whose elements of `value` are not all equal. If
// `value` were computed from bf16(key) (an input rounded before the GELU or gelu'), there would
// be none, whatever the function; rounded once from the fp32 value, elements that share a bf16
// key still differ in value.
int KeysWithSeveralValues(const std::vector<float>& key, const std::vector<float>& value) {
  std::map<uint16_t, std::set<float>> by_key;
  for (size_t i = 0; i < key.size(); ++i) by_key[FloatToBf16(key[i]).bits].insert(value[i]);
  int several = 0;
  for (const auto& [k, values] : by_key) several += values.size() > 1;
  return several;
}

// The GELU MLP's fused projections (LinearGelu, LinearBackwardGelu) against the rounding
// reference, whether the GELU ran in cuBLASLt's epilogue (widths that are multiples of 8, with and
// without a bias) or in a kernel (width 36; and every shape where cuBLASLt has no algorithm):
// forward, pre and act each rounded once from the fp32 product; backward, dpre from the product
// rounded to bf16 (an H200's DGELU epilogue rounds it before gelu' multiplies it; the kernel path
// does the same). cuBLASLt does not document how it evaluates GELU (a fast tanh would move act
// and dpre by a fraction of a bf16 step, and the tail x << 0, where 1 + tanh cancels, by more of
// its own size), so the values are compared within two bf16 steps plus 1e-3 of the largest, and
// the roundings are checked without the GELU's form: act must differ among elements that share a
// bf16 pre (KeysWithSeveralValues: act rounded once), and dpre, for one pre value, must not
// differ among elements that share a bf16 dout @ w but where that product's rounding itself
// flipped (summation order): at most 0.1% of them. Under the emulation, act from pre's bf16 value
// left no key with several values (rounded once, 315-344), and dpre rounded once from the fp32
// product left 243-292 keys with several (of 2,196-2,440 elements; from the bf16 product, none).
TEST_F(OperandParity, LinearGeluRoundsLikeTheReference) {
  testing::Bf16ReferenceBackend ref(std::make_unique<CpuBackend>(), [](int) { return false; });
  const Tol kOneStep{8e-3, 1e-5};     // bf16 rounding flipped by summation order
  const Tol kGeluForm{1.6e-2, 1e-3};  // and another evaluation of GELU
  for (const auto& [width, with_bias] : {std::pair{40, true}, {40, false}, {36, true}}) {
    const int n = 61, h = 24, f = width;
    const std::string where = absl::StrCat("width ", f, with_bias ? ", bias" : ", no bias");
    const auto x = RoundedToBf16(RandVec(rng_, n * h));
    const auto w1 = RandVec(rng_, f * h, 0.4), b1 = RandVec(rng_, f);
    const auto w2 = RandVec(rng_, h * f, 0.2);
    const auto dout = RandVec(rng_, n * h);  // fp32: the residual stream's gradient
    const auto dw0 = RandVec(rng_, h * f), db0 = RandVec(rng_, h);
    const size_t nf = static_cast<size_t>(n) * f;
    const std::vector<float> nan(nf, kNaN);
    DeviceMem r(&ref), d(dev_), c(&cpu_);
    // Forward: fc1 with its GELU.
    const Operand act_r = r.PutBf16(nan), pre_r = r.PutBf16(nan);
    const Operand act_d = d.PutBf16(nan), pre_d = d.PutBf16(nan);
    float *act_c = c.Put(nan), *pre_c = c.Put(nan);
    ref.LinearGelu(act_r, pre_r, r.PutBf16(x), r.Put(w1), with_bias ? r.Put(b1) : nullptr, n, h, f);
    dev_->LinearGelu(act_d, pre_d, d.PutBf16(x), d.Put(w1), with_bias ? d.Put(b1) : nullptr, n, h,
                     f);
    cpu_.LinearGelu(act_c, pre_c, c.Put(x), c.Put(w1), with_bias ? c.Put(b1) : nullptr, n, h, f);
    const auto act = d.Get(act_d, nf), pre = d.Get(pre_d, nf);
    EXPECT_TRUE(Close(pre, r.Get(pre_r, nf), kOneStep)) << "pre, " << where;
    EXPECT_GE(ShareEqual(pre, r.Get(pre_r, nf)), 0.95) << "pre, " << where;
    EXPECT_TRUE(Close(act, r.Get(act_r, nf), kGeluForm)) << "act, " << where;
    EXPECT_TRUE(Close(act, c.Get(act_c, nf), kGemmBf16)) << "act against fp32, " << where;
    // act from the fp32 product, not from pre's bf16 value (nor anything else rounded to it).
    EXPECT_GE(KeysWithSeveralValues(pre, act), 10) << "act rounded once, " << where;
    // Backward: fc2's GEMMs through the GELU, from the device's own act and one pre value for
    // all (gelu'(pre) a constant: dpre then depends on dout @ w alone). gelu'(-0.5) = 0.1325,
    // far from 1, so a product rounded once after it would spread over several dpre values
    // within one bf16 product value (at 0.75, gelu' = 0.99923 is 1 in bf16 and could not tell).
    const std::vector<float> pre_one(nf, -0.5f);
    const Operand dpre_r = r.PutBf16(nan), dpre_d = d.PutBf16(nan);
    float *dw_r = r.Put(dw0), *dw_d = d.Put(dw0), *db_r = r.Put(db0), *db_d = d.Put(db0);
    ref.LinearBackwardGelu(dpre_r, dw_r, db_r, r.Put(dout), r.PutBf16(act), r.PutBf16(pre_one),
                           r.Put(w2), n, f, h);
    dev_->LinearBackwardGelu(dpre_d, dw_d, db_d, d.Put(dout), d.PutBf16(act), d.PutBf16(pre_one),
                             d.Put(w2), n, f, h);
    const auto dpre = d.Get(dpre_d, nf);
    EXPECT_TRUE(Close(dpre, r.Get(dpre_r, nf), kGeluForm)) << "dpre, " << where;
    EXPECT_TRUE(Close(d.Get(dw_d, h * f), r.Get(dw_r, h * f), testing::kGemmFp32))
        << "dw, " << where;
    EXPECT_TRUE(Close(d.Get(db_d, h), r.Get(db_r, h), testing::kReduction)) << "db, " << where;
    // dout @ w as the GEMM forms it (bf16 operands, fp32 sums): dpre must be a function of its
    // bf16 value, but where the device's sums tip that rounding the other way.
    std::vector<float> product(nf);
    ref.LinearBackward(Operand(product.data()), nullptr, nullptr, RoundedToBf16(dout).data(),
                       RoundedToBf16(act).data(), RoundedToBf16(w2).data(), n, f, h, false);
    EXPECT_LE(KeysWithSeveralValues(product, dpre), static_cast<int>(nf / 1000))
        << "dpre from the bf16 product, " << where;
    EXPECT_TRUE(d.GuardsIntact());
  }
}

// GELU and SwiGLU reading bf16 pre-activations (GEMM outputs), and their backward reading a bf16
// gradient and writing bf16 gradients (also in place, dx aliasing dout); RoPE's backward on bf16.
TEST_F(OperandParity, ActivationsAndRopeBackwardOnBf16) {
  const int n = 23, ch = 64, heads = 4, hd = 16;
  const size_t nc = static_cast<size_t>(n) * ch;
  const auto x = RoundedToBf16(RandVec(rng_, nc, 2.0));
  const auto up = RoundedToBf16(RandVec(rng_, nc));
  const auto dy = RoundedToBf16(RandVec(rng_, nc));
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = 5 * i + 2;
  DeviceMem c(&cpu_), d(dev_);
  const std::vector<float> nan(nc, kNaN);
  const Operand x_d = d.PutBf16(x), up_d = d.PutBf16(up), dy_d = d.PutBf16(dy);
  {
    float* out_c = c.Put(nan);
    Operand out_d = d.PutBf16(nan);
    cpu_.GeluForward(out_c, c.Put(x), nc);
    dev_->GeluForward(out_d, x_d, nc);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "GELU out";
    float* dx_c = c.Put(nan);
    Operand dx_d = d.PutBf16(nan);
    cpu_.GeluBackward(dx_c, c.Put(dy), c.Put(x), nc);
    dev_->GeluBackward(dx_d, dy_d, x_d, nc);
    EXPECT_TRUE(Close(d.Get(dx_d, nc), c.Get(dx_c, nc), kBf16Store)) << "GELU dx";
    Operand inplace_d = d.PutBf16(dy);
    dev_->GeluBackward(inplace_d, inplace_d, x_d, nc);
    EXPECT_TRUE(Close(d.Get(inplace_d, nc), c.Get(dx_c, nc), kBf16Store)) << "GELU dx in place";
  }
  {
    float* out_c = c.Put(nan);
    Operand out_d = d.PutBf16(nan);
    cpu_.SwiGluForward(out_c, c.Put(x), c.Put(up), n, ch, ch);
    dev_->SwiGluForward(out_d, x_d, up_d, n, ch, ch);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "SwiGLU out";
    float *dg_c = c.Put(nan), *du_c = c.Put(nan);
    Operand dg_d = d.PutBf16(nan), du_d = d.PutBf16(nan);
    cpu_.SwiGluBackward(dg_c, du_c, c.Put(dy), c.Put(x), c.Put(up), n, ch, ch);
    dev_->SwiGluBackward(dg_d, du_d, dy_d, x_d, up_d, n, ch, ch);
    EXPECT_TRUE(Close(d.Get(dg_d, nc), c.Get(dg_c, nc), kBf16Store)) << "SwiGLU dgate";
    EXPECT_TRUE(Close(d.Get(du_d, nc), c.Get(du_c, nc), kBf16Store)) << "SwiGLU dup";
  }
  {
    float* r_c = c.Put(dy);
    Operand r_d = d.PutBf16(dy);
    cpu_.RopeBackward(r_c, c.Put(pos), n, heads, hd, heads * hd, RopeParams{10000.0f});
    dev_->RopeBackward(r_d, d.Put(pos), n, heads, hd, heads * hd, RopeParams{10000.0f});
    EXPECT_TRUE(Close(d.Get(r_d, nc), c.Get(r_c, nc), Tol{4e-3, 1e-4})) << "RoPE backward";
  }
  {  // The fused layouts' strided rows in bf16 (16-byte accesses): SwiGLU on the gate and up
     // halves of [n, 2 ch] rows, in place as the MLP's backward runs it, and RoPE's backward on
     // the first `heads` heads of rows of 3 heads' width (q and k parts, then v's).
    std::vector<float> gu(2 * nc);
    for (int r = 0; r < n; ++r) {
      for (int j = 0; j < ch; ++j) {
        gu[2 * static_cast<size_t>(r) * ch + j] = x[static_cast<size_t>(r) * ch + j];
        gu[(2 * static_cast<size_t>(r) + 1) * ch + j] = up[static_cast<size_t>(r) * ch + j];
      }
    }
    float *out_c = c.Put(nan), *dg_c = c.Put(nan), *du_c = c.Put(nan);
    cpu_.SwiGluForward(out_c, c.Put(x), c.Put(up), n, ch, ch);
    cpu_.SwiGluBackward(dg_c, du_c, c.Put(dy), c.Put(x), c.Put(up), n, ch, ch);
    const Operand gu_d = d.PutBf16(gu), out_d = d.PutBf16(nan);
    dev_->SwiGluForward(out_d, gu_d, gu_d.At(ch), n, ch, 2 * ch);
    dev_->SwiGluBackward(gu_d, gu_d.At(ch), dy_d, gu_d, gu_d.At(ch), n, ch, 2 * ch);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "strided SwiGLU out";
    const std::vector<float> grads = d.Get(gu_d, 2 * nc), dg = c.Get(dg_c, nc),
                             du = c.Get(du_c, nc);
    const auto got = OutOfRows(grads, n, 2 * ch, {ch, ch});  // dgate, dup
    EXPECT_TRUE(Close(got[0], dg, kBf16Store)) << "strided SwiGLU dgate in place";
    EXPECT_TRUE(Close(got[1], du, kBf16Store)) << "strided SwiGLU dup in place";
    const int stride = 3 * ch, qk = 2 * ch / hd;  // rows [q (ch) | k (ch) | v (ch)]
    std::vector<float> rows(static_cast<size_t>(n) * stride);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = dy[i % nc];
    float* r_c = c.Put(rows);
    const Operand r_d = d.PutBf16(rows);
    cpu_.RopeBackward(r_c, c.Put(pos), n, qk, hd, stride, RopeParams{10000.0f});
    dev_->RopeBackward(r_d, d.Put(pos), n, qk, hd, stride, RopeParams{10000.0f});
    EXPECT_TRUE(Close(d.Get(r_d, rows.size()), c.Get(r_c, rows.size()), Tol{4e-3, 1e-4}))
        << "strided RoPE backward";
  }
  EXPECT_TRUE(d.GuardsIntact());
}

// The heads' logit gradients, which their backward GEMMs read, written as bf16 by the
// cross-entropy and by its vocabulary-parallel form (the logits stay fp32).
TEST_F(OperandParity, CrossEntropyWritesBf16LogitGradients) {
  const int n = 9, v = 300, start = 150;
  const size_t nv = static_cast<size_t>(n) * v;
  const auto logits = RandVec(rng_, nv, 4.0);
  std::vector<int32_t> targets(n);
  for (int r = 0; r < n; ++r) targets[r] = (r * 97) % (2 * v);  // some outside [start, start+v)
  std::vector<float> weights(n);
  for (int r = 0; r < n; ++r) weights[r] = 0.1f * (r + 1);
  DeviceMem c(&cpu_), d(dev_);
  const std::vector<float> nan(nv, kNaN), nan_rows(n, kNaN);
  {
    std::vector<int32_t> in_range(targets);
    for (int32_t& t : in_range) t %= v;
    float *loss_c = c.Put(nan_rows), *dl_c = c.Put(nan), *loss_d = d.Put(nan_rows);
    Operand dl_d = d.PutBf16(nan);
    cpu_.CrossEntropy(loss_c, nullptr, dl_c, c.Put(logits), c.Put(in_range), c.Put(weights), false,
                      n, v);
    dev_->CrossEntropy(loss_d, nullptr, dl_d, d.Put(logits), d.Put(in_range), d.Put(weights), false,
                       n, v);
    EXPECT_TRUE(Close(d.Get(loss_d, n), c.Get(loss_c, n), testing::kReduction)) << "losses";
    EXPECT_TRUE(Close(d.Get(dl_d, nv), c.Get(dl_c, nv), kBf16Store)) << "dlogits";
  }
  {  // This rank's share [start, start + v): the row statistics given, as the caller combines them.
    std::vector<float> row_max(n), sum_exp(n);
    for (int r = 0; r < n; ++r) {
      row_max[r] = 1.0f + 0.01f * r;
      sum_exp[r] = 50.0f + r;
    }
    float* dl_c = c.Put(nan);
    Operand dl_d = d.PutBf16(nan);
    cpu_.CrossEntropyGradRange(dl_c, c.Put(logits), c.Put(row_max), c.Put(sum_exp), c.Put(targets),
                               c.Put(weights), false, n, v, start);
    dev_->CrossEntropyGradRange(dl_d, d.Put(logits), d.Put(row_max), d.Put(sum_exp), d.Put(targets),
                                d.Put(weights), false, n, v, start);
    EXPECT_TRUE(Close(d.Get(dl_d, nv), c.Get(dl_c, nv), kBf16Store)) << "dlogits range";
  }
  EXPECT_TRUE(d.GuardsIntact());
}

// The training heads' logits are bf16 operands too (the GEMM rounds them once), read by the
// cross-entropy, its vocabulary-parallel pieces and an exit's temperature scaling, with the
// gradient written over them in place or elsewhere: the CPU's results on the same values.
TEST_F(OperandParity, CrossEntropyReadsBf16Logits) {
  for (int v : {300, 1000, 1004}) {  // 1004: rows not of whole 16-byte pieces (not staged)
    SCOPED_TRACE(::testing::Message() << "v " << v);
    const int n = 9, start = v / 2;
    const size_t nv = static_cast<size_t>(n) * v;
    const auto logits = RoundedToBf16(RandVec(rng_, nv, 4.0));
    std::vector<int32_t> targets(n), in_range(n);
    for (int r = 0; r < n; ++r) {
      targets[r] = (r * 97) % (2 * v);  // some outside [start, start + v)
      in_range[r] = targets[r] % v;
    }
    in_range[0] = v - 1;
    std::vector<float> weights(n);
    for (int r = 0; r < n; ++r) weights[r] = 0.1f * (r + 1);
    DeviceMem c(&cpu_), d(dev_);
    const std::vector<float> nan(nv, kNaN), nan_rows(n, kNaN);
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(in_place ? "in place" : "apart");
      float *loss_c = c.Put(nan_rows), *max_c = c.Put(nan_rows), *dl_c = c.Put(nan);
      float *loss_d = d.Put(nan_rows), *max_d = d.Put(nan_rows);
      const Operand l_d = d.PutBf16(logits);
      const Operand dl_d = in_place ? l_d : d.PutBf16(nan);
      cpu_.CrossEntropy(loss_c, max_c, dl_c, c.Put(logits), c.Put(in_range), c.Put(weights), false,
                        n, v);
      dev_->CrossEntropy(loss_d, max_d, dl_d, l_d, d.Put(in_range), d.Put(weights), false, n, v);
      EXPECT_TRUE(Close(d.Get(loss_d, n), c.Get(loss_c, n), testing::kReduction)) << "losses";
      EXPECT_TRUE(Close(d.Get(max_d, n), c.Get(max_c, n), testing::kReduction)) << "max prob";
      EXPECT_TRUE(Close(d.Get(dl_d, nv), c.Get(dl_c, nv), kBf16Store)) << "dlogits";
    }
    {  // The vocabulary-parallel pieces on this rank's share [start, start + v).
      std::vector<float> row_max(n), sum_exp(n), target_logit(n);
      float *m_c = c.Put(nan_rows), *m_d = d.Put(nan_rows);
      const Operand l_d = d.PutBf16(logits);
      cpu_.RowMax(m_c, c.Put(logits), n, v);
      dev_->RowMax(m_d, l_d, n, v);
      EXPECT_TRUE(Close(d.Get(m_d, n), c.Get(m_c, n), testing::kExact)) << "row max";
      float *s_c = c.Put(nan_rows), *t_c = c.Put(nan_rows);
      float *s_d = d.Put(nan_rows), *t_d = d.Put(nan_rows);
      cpu_.SumExpAndTarget(s_c, t_c, c.Put(logits), m_c, c.Put(targets), n, v, start);
      dev_->SumExpAndTarget(s_d, t_d, l_d, m_d, d.Put(targets), n, v, start);
      EXPECT_TRUE(Close(d.Get(s_d, n), c.Get(s_c, n), testing::kReduction)) << "sum exp";
      EXPECT_TRUE(Close(d.Get(t_d, n), c.Get(t_c, n), testing::kExact)) << "target logit";
      float* dl_c = c.Put(nan);
      cpu_.CrossEntropyGradRange(dl_c, c.Put(logits), m_c, s_c, c.Put(targets), c.Put(weights),
                                 false, n, v, start);
      dev_->CrossEntropyGradRange(l_d, l_d, m_d, s_d, d.Put(targets), d.Put(weights), false, n, v,
                                  start);
      EXPECT_TRUE(Close(d.Get(l_d, nv), c.Get(dl_c, nv), kBf16Store)) << "dlogits range, in place";
    }
    {  // An exit's temperature: x / T, rounded once.
      float* x_c = c.Put(logits);
      const Operand x_d = d.PutBf16(logits);
      cpu_.Scale(x_c, 1.0f / 1.7f, nv);
      dev_->Scale(x_d, 1.0f / 1.7f, nv);
      EXPECT_TRUE(Close(d.Get(x_d, nv), RoundedToBf16(c.Get(x_c, nv)), testing::kExact))
          << "scaled";
    }
    EXPECT_TRUE(d.GuardsIntact());
  }
}

// Attention reads q, k, v and writes O as bf16; its backward reads them and a bf16 dO (D = dO . O)
// and writes bf16 dq, dk, dv; head_dim 32 runs the fused kernels, 24 the per-head GEMM path.
// Head dims 32 and 24 run on the fused kernels (or per head); 64 and 128 on cuDNN's fused
// attention where the build has it (cudnn_attention.h; stderr says which).
TEST_F(OperandParity, AttentionWritesAndReadsBf16Output) {
  for (int dh : {32, 24, 64, 128}) {
    SCOPED_TRACE(::testing::Message() << "head_dim " << dh);
    const int b = 2, t = 70, hq = 4, hkv = 2;
    const size_t nq = static_cast<size_t>(b) * t * hq * dh,
                 nkv = static_cast<size_t>(b) * t * hkv * dh;
    const size_t nl = static_cast<size_t>(b) * hq * t;
    const auto q = RoundedToBf16(RandVec(rng_, nq)), k = RoundedToBf16(RandVec(rng_, nkv)),
               v = RoundedToBf16(RandVec(rng_, nkv));
    const auto dout = RoundedToBf16(RandVec(rng_, nq));
    DeviceMem c(&cpu_), d(dev_);
    float *out_c = c.Put(std::vector<float>(nq, kNaN)), *lse_c = c.Put(std::vector<float>(nl));
    Operand out_d = d.PutBf16(std::vector<float>(nq, kNaN));
    float* lse_d = d.Put(std::vector<float>(nl, kNaN));
    float *q_c = c.Put(q), *k_c = c.Put(k), *v_c = c.Put(v);
    const Operand q_d = d.PutBf16(q), k_d = d.PutBf16(k), v_d = d.PutBf16(v);
    cpu_.AttentionForward(out_c, lse_c, q_c, k_c, v_c, b, t, t, t, hq, hkv, dh, 0, hq * dh,
                          hkv * dh);
    dev_->AttentionForward(out_d, lse_d, q_d, k_d, v_d, b, t, t, t, hq, hkv, dh, 0, hq * dh,
                           hkv * dh);
    EXPECT_TRUE(Close(d.Get(out_d, nq), c.Get(out_c, nq), kGemmBf16)) << "out";
    EXPECT_TRUE(Close(d.Get(lse_d, nl), c.Get(lse_c, nl), kGemmBf16)) << "lse";
    const std::vector<float> nan_q(nq, kNaN), nan_kv(nkv, kNaN);
    float *dq_c = c.Put(nan_q), *dk_c = c.Put(nan_kv), *dv_c = c.Put(nan_kv);
    const Operand dq_d = d.PutBf16(nan_q), dk_d = d.PutBf16(nan_kv), dv_d = d.PutBf16(nan_kv);
    cpu_.AttentionBackward(dq_c, dk_c, dv_c, c.Put(dout), out_c, lse_c, q_c, k_c, v_c, b, t, hq,
                           hkv, dh, hq * dh, hkv * dh);
    const Operand dout_d = d.PutBf16(dout);
    dev_->AttentionBackward(dq_d, dk_d, dv_d, dout_d, out_d, lse_d, q_d, k_d, v_d, b, t, hq, hkv,
                            dh, hq * dh, hkv * dh);
    const std::vector<float> want_dq = c.Get(dq_c, nq), want_dk = c.Get(dk_c, nkv),
                             want_dv = c.Get(dv_c, nkv);
    EXPECT_TRUE(Close(d.Get(dq_d, nq), want_dq, kGemmBf16)) << "dq";
    EXPECT_TRUE(Close(d.Get(dk_d, nkv), want_dk, kGemmBf16)) << "dk";
    EXPECT_TRUE(Close(d.Get(dv_d, nkv), want_dv, kGemmBf16)) << "dv";
    // The same attention on q, k, v as the parts of one buffer of rows [q | k | v | 8 more]
    // (NaN: never read), with the gradients into such rows [dq | dk | dv | 8 more] (the 8 a
    // sentinel, 7, left untouched): the attention branch's fused layout (models/layers.cc),
    // through the same paths (cuDNN's graphs with strided tensors on a GPU with cuDNN; head dim
    // 24: the bf16 conversion into rows).
    const int rows = b * t, qc = hq * dh, kc = hkv * dh, stride = qc + 2 * kc + 8;
    const std::vector<float> qkv = InRows({&q, &k, &v}, rows, stride, kNaN);
    std::vector<float> init(qkv.size(), kNaN);
    for (int r = 0; r < rows; ++r) {
      std::fill_n(init.begin() + static_cast<size_t>(r) * stride + stride - 8, 8, 7.0f);
    }
    const Operand x = d.PutBf16(qkv), g = d.PutBf16(init);
    const Operand out_rows = d.PutBf16(std::vector<float>(nq, kNaN));
    float* lse_rows = d.Put(std::vector<float>(nl, kNaN));
    dev_->AttentionForward(out_rows, lse_rows, x, x.At(qc), x.At(qc + kc), b, t, t, t, hq, hkv, dh,
                           0, stride, stride);
    EXPECT_TRUE(Close(d.Get(out_rows, nq), c.Get(out_c, nq), kGemmBf16)) << "out from fused rows";
    EXPECT_TRUE(Close(d.Get(lse_rows, nl), c.Get(lse_c, nl), kGemmBf16)) << "lse from fused rows";
    dev_->AttentionBackward(g, g.At(qc), g.At(qc + kc), dout_d, out_d, lse_d, x, x.At(qc),
                            x.At(qc + kc), b, t, hq, hkv, dh, stride, stride);
    const std::vector<float> got = d.Get(g, init.size());
    const auto parts = OutOfRows(got, rows, stride, {qc, kc, kc, 8});  // dq, dk, dv, sentinel
    for (size_t i = 0; i < parts[3].size(); ++i) {
      ASSERT_EQ(parts[3][i], 7.0f) << "row " << i / 8;
    }
    EXPECT_TRUE(Close(parts[0], want_dq, kGemmBf16)) << "dq in fused rows";
    EXPECT_TRUE(Close(parts[1], want_dk, kGemmBf16)) << "dk in fused rows";
    EXPECT_TRUE(Close(parts[2], want_dv, kGemmBf16)) << "dv in fused rows";
    EXPECT_TRUE(d.GuardsIntact());
  }
}

// The backward gives the same bits twice (no atomics in either path: the fused kernels' separate
// dQ pass, cuDNN's graph whose dQ is written by its matmul).
TEST_F(OperandParity, AttentionBackwardIsDeterministic) {
  for (int dh : {32, 128}) {
    SCOPED_TRACE(::testing::Message() << "head_dim " << dh);
    const int b = 2, t = 200, hq = 4, hkv = 2;
    const size_t nq = static_cast<size_t>(b) * t * hq * dh,
                 nkv = static_cast<size_t>(b) * t * hkv * dh;
    DeviceMem d(dev_);
    const Operand q = d.PutBf16(RandVec(rng_, nq)), k = d.PutBf16(RandVec(rng_, nkv)),
                  v = d.PutBf16(RandVec(rng_, nkv)), dout = d.PutBf16(RandVec(rng_, nq));
    const Operand out = d.PutBf16(std::vector<float>(nq, kNaN));
    float* lse = d.Put(std::vector<float>(static_cast<size_t>(b) * hq * t, kNaN));
    dev_->AttentionForward(out, lse, q, k, v, b, t, t, t, hq, hkv, dh, 0, hq * dh, hkv * dh);
    std::vector<std::vector<float>> runs;
    for (int run = 0; run < 2; ++run) {
      const Operand dq = d.PutBf16(std::vector<float>(nq, kNaN)),
                    dk = d.PutBf16(std::vector<float>(nkv, kNaN)),
                    dv = d.PutBf16(std::vector<float>(nkv, kNaN));
      dev_->AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v, b, t, hq, hkv, dh, hq * dh,
                              hkv * dh);
      std::vector<float> all = d.Get(dq, nq);
      for (const Operand& g : {dk, dv}) {
        const std::vector<float> part = d.Get(g, nkv);
        all.insert(all.end(), part.begin(), part.end());
      }
      for (float x : all) ASSERT_FALSE(std::isnan(x)) << "a gradient element was not written";
      runs.push_back(std::move(all));
    }
    EXPECT_EQ(0, std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)));
    EXPECT_TRUE(d.GuardsIntact());
  }
}

TEST(SameRoundingsButRareFlipsTest, AllowsRareOneStepFlipsOnly) {
  const Tol tol{4e-3, 1e-5};
  std::vector<float> want(1000);
  for (size_t i = 0; i < want.size(); ++i) want[i] = -0.0157470703125f;  // bf16 0xbc81
  std::vector<float> got = want;
  got[3] = -0.015625f;  // 0xbc80: one step, 2^-7 of the value
  EXPECT_FALSE(Close(got, want, tol));
  EXPECT_TRUE(SameRoundingsButRareFlips(got, want, tol));
  got[4] = -0.015625f;  // two flips in 1000: more than 1e-3 of them
  EXPECT_FALSE(SameRoundingsButRareFlips(got, want, tol));
  got[4] = want[4];
  got[5] = -0.0155029296875f;  // 0xbc7e: two steps
  EXPECT_FALSE(SameRoundingsButRareFlips(got, want, tol));
}

// The fused attention over many key tiles, with scores rising along the keys (every tile raises
// the row's reference maximum, so O and l are rescaled), against the rounding reference
// (Bf16ReferenceBackend, which follows the fused kernels' tiles and roundings): forward and
// backward agree to fp32 noise, far inside the bf16 tolerance the CPU comparisons use.
TEST_F(OperandParity, FusedAttentionMatchesRoundingReferenceOverTiles) {
  const int b = 1, hq = 2, hkv = 1, t = 200, dh = 32;
  const size_t nq = static_cast<size_t>(b) * t * hq * dh,
               nkv = static_cast<size_t>(b) * t * hkv * dh;
  const size_t nl = static_cast<size_t>(b) * hq * t;
  auto q = RandVec(rng_, nq, 0.1), k = RandVec(rng_, nkv, 0.1);
  for (float& x : q) x += 1.0f;
  const float ramp = 0.3f * std::sqrt(static_cast<float>(dh)) / dh;  // per key, after the scale
  for (int j = 0; j < t; ++j) {
    for (int e = 0; e < dh; ++e) k[static_cast<size_t>(j) * hkv * dh + e] += ramp * j;
  }
  q = RoundedToBf16(q);
  k = RoundedToBf16(k);
  const auto v = RoundedToBf16(RandVec(rng_, nkv)), dout = RoundedToBf16(RandVec(rng_, nq));
  testing::Bf16ReferenceBackend ref(std::make_unique<CpuBackend>(),
                                    [](int d) { return d == 32 || d == 64 || d == 128; });
  DeviceMem r(&ref), d(dev_);
  const std::vector<float> nan_q(nq, kNaN), nan_kv(nkv, kNaN);
  const Operand out_r = r.PutBf16(nan_q), out_d = d.PutBf16(nan_q);
  float *lse_r = r.Put(std::vector<float>(nl, kNaN)), *lse_d = d.Put(std::vector<float>(nl, kNaN));
  const Operand q_r = r.PutBf16(q), k_r = r.PutBf16(k), v_r = r.PutBf16(v);
  const Operand q_d = d.PutBf16(q), k_d = d.PutBf16(k), v_d = d.PutBf16(v);
  ref.AttentionForward(out_r, lse_r, q_r, k_r, v_r, b, t, t, t, hq, hkv, dh, 0, hq * dh, hkv * dh);
  dev_->AttentionForward(out_d, lse_d, q_d, k_d, v_d, b, t, t, t, hq, hkv, dh, 0, hq * dh,
                         hkv * dh);
  // fp32 noise (and the rare bf16 rounding it tips: SameRoundingsButRareFlips).
  const Tol kSameRounding{4e-3, 1e-5};
  EXPECT_TRUE(SameRoundingsButRareFlips(d.Get(out_d, nq), r.Get(out_r, nq), kSameRounding))
      << "out";
  EXPECT_TRUE(Close(d.Get(lse_d, nl), r.Get(lse_r, nl), testing::kGemmFp32)) << "lse";
  const Operand dq_r = r.PutBf16(nan_q), dk_r = r.PutBf16(nan_kv), dv_r = r.PutBf16(nan_kv);
  const Operand dq_d = d.PutBf16(nan_q), dk_d = d.PutBf16(nan_kv), dv_d = d.PutBf16(nan_kv);
  ref.AttentionBackward(dq_r, dk_r, dv_r, r.PutBf16(dout), out_r, lse_r, q_r, k_r, v_r, b, t, hq,
                        hkv, dh, hq * dh, hkv * dh);
  dev_->AttentionBackward(dq_d, dk_d, dv_d, d.PutBf16(dout), out_d, lse_d, q_d, k_d, v_d, b, t, hq,
                          hkv, dh, hq * dh, hkv * dh);
  EXPECT_TRUE(SameRoundingsButRareFlips(d.Get(dq_d, nq), r.Get(dq_r, nq), kSameRounding)) << "dq";
  EXPECT_TRUE(SameRoundingsButRareFlips(d.Get(dk_d, nkv), r.Get(dk_r, nkv), kSameRounding)) << "dk";
  EXPECT_TRUE(SameRoundingsButRareFlips(d.Get(dv_d, nkv), r.Get(dv_r, nkv), kSameRounding)) << "dv";
  EXPECT_TRUE(d.GuardsIntact());
}

}  // namespace
}  // namespace eellm
