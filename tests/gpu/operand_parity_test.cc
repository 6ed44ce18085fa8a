// Parity of the ops that take or produce bf16 operands (engine/tensor/operand.h), on a
// backend whose operand_dtype() is bf16 (cuda-bf16w; the test skips on the others): the
// backend under test gets bf16 operands, the CPU the same values in fp32 (inputs rounded to
// bf16 on the host first), and the results must agree within the bf16 tolerances. Outputs start
// as NaN, so every element must be written.
#include <cmath>
#include <limits>
#include <vector>

#include "engine/backend.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/parity_backend.h"
#include "tests/gpu/parity_tolerances.h"

namespace eellm {
namespace {

using cpu_test::RandVec;
using testing::Close;
using testing::kGemmBf16;
using testing::Tol;

// A bf16 store rounds to 8 significant bits: 2^-9 relative, plus fp32 differences before it.
constexpr Tol kBf16Store{4e-3, 1e-6};
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> RoundedToBf16(std::vector<float> x) {
  for (float& v : x) v = Bf16ToFloat(FloatToBf16(v));
  return x;
}

// Device buffers of one test, freed at the end.
class Buffers {
 public:
  explicit Buffers(Backend* be) : be_(be) {}
  ~Buffers() {
    for (void* p : ptrs_) be_->Free(p);
  }
  float* F32(const std::vector<float>& host) {
    auto* p = static_cast<float*>(Alloc(host.size() * sizeof(float)));
    be_->CopyFromHost(p, host.data(), host.size() * sizeof(float));
    return p;
  }
  Operand Bf16(const std::vector<float>& host) {
    Operand op(Alloc(host.size() * sizeof(bf16)), DType::kBF16);
    OperandFromHost(be_, op, host.data(), host.size());
    return op;
  }
  std::vector<float> Get(ConstOperand op, size_t n) {
    std::vector<float> host(n);
    be_->Synchronize();
    OperandToHost(be_, host.data(), op, n);
    return host;
  }

 private:
  void* Alloc(size_t bytes) {
    ptrs_.push_back(be_->Alloc(bytes));
    return ptrs_.back();
  }
  Backend* be_;
  std::vector<void*> ptrs_;
};

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
  Buffers c(&cpu_), d(dev_);
  // Forward.
  float* y_c = c.F32(std::vector<float>(n * out, kNaN));
  float* y_d = d.F32(std::vector<float>(n * out, kNaN));
  cpu_.Linear(y_c, c.F32(x), c.F32(w), c.F32(bias), n, in, out, false);
  dev_->Linear(y_d, d.Bf16(x), d.F32(w), d.F32(bias), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(y_d, n * out), c.Get(y_c, n * out), kGemmBf16)) << "out";
  // Backward: din written, dw and dbias accumulated.
  float* din_c = c.F32(std::vector<float>(n * in, kNaN));
  float* din_d = d.F32(std::vector<float>(n * in, kNaN));
  float *dw_c = c.F32(dw0), *dw_d = d.F32(dw0), *db_c = c.F32(db0), *db_d = d.F32(db0);
  cpu_.LinearBackward(din_c, dw_c, db_c, c.F32(dout), c.F32(x), c.F32(w), n, in, out, false);
  dev_->LinearBackward(din_d, dw_d, db_d, d.F32(dout), d.Bf16(x), d.F32(w), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(din_d, n * in), c.Get(din_c, n * in), kGemmBf16)) << "din";
  EXPECT_TRUE(Close(d.Get(dw_d, out * in), c.Get(dw_c, out * in), kGemmBf16)) << "dw";
  EXPECT_TRUE(Close(d.Get(db_d, out), c.Get(db_c, out), testing::kReduction)) << "dbias";
}

// GEMM outputs in bf16 (q, k, v): the product rounded once, the bias added after; RoPE in place
// on bf16.
TEST_F(OperandParity, LinearAndRopeWriteBf16) {
  const int n = 21, in = 40, out = 48, heads = 3, hd = 16;
  const auto x = RoundedToBf16(RandVec(rng_, n * in));
  const auto w = RandVec(rng_, out * in, 0.2);
  const auto bias = RandVec(rng_, out);
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = 3 * i + 1;
  Buffers c(&cpu_), d(dev_);
  float* y_c = c.F32(std::vector<float>(n * out, kNaN));
  Operand y_d = d.Bf16(std::vector<float>(n * out, kNaN));
  cpu_.Linear(y_c, c.F32(x), c.F32(w), c.F32(bias), n, in, out, false);
  dev_->Linear(y_d, d.Bf16(x), d.F32(w), d.F32(bias), n, in, out, false);
  EXPECT_TRUE(Close(d.Get(y_d, n * out), c.Get(y_c, n * out), kGemmBf16)) << "out";
  // RoPE on the (rounded) result, heads x head_dim = out.
  const auto y = RoundedToBf16(d.Get(y_d, n * out));
  float* r_c = c.F32(y);
  Operand r_d = d.Bf16(y);
  auto* pos_c = static_cast<int32_t*>(cpu_.Alloc(n * sizeof(int32_t)));
  auto* pos_d = static_cast<int32_t*>(dev_->Alloc(n * sizeof(int32_t)));
  cpu_.CopyFromHost(pos_c, pos.data(), n * sizeof(int32_t));
  dev_->CopyFromHost(pos_d, pos.data(), n * sizeof(int32_t));
  cpu_.RopeForward(r_c, pos_c, n, heads, hd, 10000.0f);
  dev_->RopeForward(r_d, pos_d, n, heads, hd, 10000.0f);
  EXPECT_TRUE(Close(d.Get(r_d, n * out), c.Get(r_c, n * out), Tol{4e-3, 1e-4})) << "RoPE";
  cpu_.Free(pos_c);
  dev_->Free(pos_d);
}

TEST_F(OperandParity, NormsAndActivationsWriteBf16) {
  const int n = 19, ch = 72;
  const size_t nc = static_cast<size_t>(n) * ch;
  const auto x = RandVec(rng_, nc, 2.0);
  const auto up = RandVec(rng_, nc);
  const auto g = RandVec(rng_, ch), b = RandVec(rng_, ch);
  Buffers c(&cpu_), d(dev_);
  const std::vector<float> nan(nc, kNaN), nan_rows(n, kNaN);
  {
    float *out_c = c.F32(nan), *mean_c = c.F32(nan_rows), *rstd_c = c.F32(nan_rows);
    Operand out_d = d.Bf16(nan);
    float *mean_d = d.F32(nan_rows), *rstd_d = d.F32(nan_rows);
    cpu_.LayerNormForward(out_c, mean_c, rstd_c, c.F32(x), c.F32(g), c.F32(b), n, ch, 1e-5f);
    dev_->LayerNormForward(out_d, mean_d, rstd_d, d.F32(x), d.F32(g), d.F32(b), n, ch, 1e-5f);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "LayerNorm out";
    EXPECT_TRUE(Close(d.Get(rstd_d, n), c.Get(rstd_c, n), testing::kReduction)) << "rstd";
  }
  {
    float *out_c = c.F32(nan), *rstd_c = c.F32(nan_rows);
    Operand out_d = d.Bf16(nan);
    float* rstd_d = d.F32(nan_rows);
    cpu_.RmsNormForward(out_c, rstd_c, c.F32(x), c.F32(g), n, ch, 1e-5f);
    dev_->RmsNormForward(out_d, rstd_d, d.F32(x), d.F32(g), n, ch, 1e-5f);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "RmsNorm out";
  }
  {
    float* out_c = c.F32(nan);
    Operand out_d = d.Bf16(nan);
    cpu_.GeluForward(out_c, c.F32(x), nc);
    dev_->GeluForward(out_d, d.F32(x), nc);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "GELU out";
  }
  {
    float* out_c = c.F32(nan);
    Operand out_d = d.Bf16(nan);
    cpu_.SwiGluForward(out_c, c.F32(x), c.F32(up), nc);
    dev_->SwiGluForward(out_d, d.F32(x), d.F32(up), nc);
    EXPECT_TRUE(Close(d.Get(out_d, nc), c.Get(out_c, nc), kBf16Store)) << "SwiGLU out";
  }
}

// Attention reads q, k, v and writes O as bf16, and its backward reads them (D = dO . O);
// head_dim 32 runs the fused kernels, 24 the per-head GEMM path.
TEST_F(OperandParity, AttentionWritesAndReadsBf16Output) {
  for (int dh : {32, 24}) {
    SCOPED_TRACE(::testing::Message() << "head_dim " << dh);
    const int b = 2, t = 70, hq = 4, hkv = 2;
    const size_t nq = static_cast<size_t>(b) * t * hq * dh,
                 nkv = static_cast<size_t>(b) * t * hkv * dh;
    const size_t nl = static_cast<size_t>(b) * hq * t;
    const auto q = RoundedToBf16(RandVec(rng_, nq)), k = RoundedToBf16(RandVec(rng_, nkv)),
               v = RoundedToBf16(RandVec(rng_, nkv));
    const auto dout = RandVec(rng_, nq);
    Buffers c(&cpu_), d(dev_);
    float *out_c = c.F32(std::vector<float>(nq, kNaN)), *lse_c = c.F32(std::vector<float>(nl));
    Operand out_d = d.Bf16(std::vector<float>(nq, kNaN));
    float* lse_d = d.F32(std::vector<float>(nl, kNaN));
    float *q_c = c.F32(q), *k_c = c.F32(k), *v_c = c.F32(v);
    const Operand q_d = d.Bf16(q), k_d = d.Bf16(k), v_d = d.Bf16(v);
    cpu_.AttentionForward(out_c, lse_c, q_c, k_c, v_c, b, t, t, t, hq, hkv, dh, 0);
    dev_->AttentionForward(out_d, lse_d, q_d, k_d, v_d, b, t, t, t, hq, hkv, dh, 0);
    EXPECT_TRUE(Close(d.Get(out_d, nq), c.Get(out_c, nq), kGemmBf16)) << "out";
    EXPECT_TRUE(Close(d.Get(lse_d, nl), c.Get(lse_c, nl), kGemmBf16)) << "lse";
    const std::vector<float> nan_q(nq, kNaN), nan_kv(nkv, kNaN);
    float *dq_c = c.F32(nan_q), *dk_c = c.F32(nan_kv), *dv_c = c.F32(nan_kv);
    float *dq_d = d.F32(nan_q), *dk_d = d.F32(nan_kv), *dv_d = d.F32(nan_kv);
    cpu_.AttentionBackward(dq_c, dk_c, dv_c, c.F32(dout), out_c, lse_c, q_c, k_c, v_c, b, t, hq,
                           hkv, dh);
    dev_->AttentionBackward(dq_d, dk_d, dv_d, d.F32(dout), out_d, lse_d, q_d, k_d, v_d, b, t, hq,
                            hkv, dh);
    EXPECT_TRUE(Close(d.Get(dq_d, nq), c.Get(dq_c, nq), kGemmBf16)) << "dq";
    EXPECT_TRUE(Close(d.Get(dk_d, nkv), c.Get(dk_c, nkv), kGemmBf16)) << "dk";
    EXPECT_TRUE(Close(d.Get(dv_d, nkv), c.Get(dv_c, nkv), kGemmBf16)) << "dv";
  }
}

}  // namespace
}  // namespace eellm
