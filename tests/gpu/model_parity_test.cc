// Backend parity of a whole training step (see backend_parity_test.cc for the op-by-op suite):
// a tiny early-exit model (Llama style with GQA, GPT style) is built on the CPU and on the
// backend under test (EELLM_PARITY_BACKEND, default "cuda"; every test skips where it cannot be
// made) with the same parameters, copied by value through the host; one forward + backward +
// AdamW step must give the same losses (final head and every exit), gradients, optimizer moments
// and updated parameters, and a forward after the step the same losses again.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "engine/backend.h"
#include "engine/optim/adamw.h"
#include "gtest/gtest.h"
#include "models/transformer.h"
#include "tests/gpu/bf16_reference_backend.h"
#include "tests/gpu/parity_backend.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

// Tolerance of the whole step: |a - b| <= kAtol * scale + kRtol * |b| element by element, b the
// CPU's value and `scale` the largest |b| of the tensor (of a parameter's gradient, moment or
// value). The step chains ~40 ops over 3 layers and 2 exits, each within ~1e-6 of the values'
// magnitude when only the summation order differs (see backend_parity_test.cc); a CPU-side
// emulation of another summation order (naive reversed fp32 loops for every GEMM, attention,
// norm and softmax) moved gradients by at most 5e-6 of their tensor's magnitude. 1e-4 leaves 20x
// headroom and still fails TF32 GEMMs or any wrong formula.
// Backends with bf16 GEMMs (names containing "bf16") get 1e-1: a check that they compute the
// right step, not of their accuracy (bf16 operands carry 8 significant bits; the CUDA backend's
// bf16 mode under the CPU emulation, which rounds exactly as the tensor cores do, needed 1.08x
// of 5e-2 on a few of the ~10^4 gradient and moment elements).
// Backends that also store operands in bf16 (cuda-bf16w) are compared with the CPU's arithmetic
// rounded where the device rounds (Bf16ReferenceBackend: stored operands, GEMM inputs, and the
// probabilities and dS inside attention). That leaves the summation order, and the rare bf16
// rounding that its fp32 noise tips the other way, which moves one element by 2^-8 and the
// gradients it feeds by ~1e-4 of their magnitude. Under the CPU emulation the per-head path
// (head_dim 8) matched bit for bit and the fused attention (head_dim 32) within 1e-6 (relative
// norm per tensor); 2e-3 leaves room for a real device's flips and still fails a single missing
// or extra rounding inside the fused kernels (an unrounded sum of P in the forward failed at
// 4.5x; dS from a rounded P at 1.8x), which the fp32 reference's 1e-1 could not see (it
// needed 0.6 for the GPT step at head_dim 32).
// On a real GPU (the first run, an H200) the step of cuda-bf16w came within 2e-3 of the rounding
// reference only where attention ran per head and the MLP was SwiGLU (Llama, head_dim 8); with the
// fused attention (head_dim 32) gradients and moments were up to 19x (v: 24x) of that bound off,
// the GELU MLP 2-3x: the device sums in other orders than the CPU, tips some bf16 roundings the
// other way (OperandParity: 3 of 12,800 dq elements of the fused attention), and this tiny
// random model amplifies each such flip (bf16 against fp32 needed 0.6 of the scale, above). There
// the step is held to the bf16 bound, 1e-1 (the worst, 19 x 2e-3 = 3.8e-2, within it 2.6x), and
// each op to the rounding reference in OperandParity; the emulation, which sums in the CPU's
// order, keeps 2e-3.
const bool kBf16 = testing::ParityBackendHasBf16Gemms();
const bool kBf16Operands = testing::ParityBackendHasBf16Operands();
const bool kEmulated = testing::ParityBackendName().rfind("emulated-", 0) == 0;
const bool kSameOrderReference = kBf16Operands && kEmulated;
// Under the emulation, cuda-bf16w runs cuDNN's attention graphs at head dims 64 to 128 (unless
// EELLM_CUDNN_ATTENTION=0); the reference then rounds as they do.
const bool kEmulatedCudnn = testing::ParityBackendRunsEmulatedCudnnGraphs(64);
const double kRtol = kSameOrderReference ? 2e-3 : kBf16 ? 1e-1 : 1e-4;
const double kAtol = kSameOrderReference ? 2e-3 : kBf16 ? 1e-1 : 1e-4;
// A parameter whose CPU gradient stays below kZeroGrad times the largest gradient of the model
// has a gradient that is zero in exact arithmetic and rounding noise in fp32: the key bias of
// GPT attention (every row of the softmax gradient sums to 0, so sum_j dk_j = 0). Its noise
// differs between summation orders by 100% and is only required to stay that small (with bf16
// GEMMs, as small as kAtol: there dP comes from bf16 operands while the fused attention's
// D = dO . O is fp32, so rows of dS sum to bf16 noise; measured 4.6e-3 of the largest gradient
// against the fp32 CPU). Against the rounding reference (cuda-bf16w) under the emulation that
// noise is the same on both sides, and the key bias is compared like every other gradient. On a
// real GPU the reference's noise is not the device's (an H200: 5.5e-4 against 7.1e-4, of
// opposite signs): there the key bias (named, as its size is no guide: other tensors are as
// small) is held to the zero rule whatever the reference's value.
constexpr double kZeroGrad = 1e-5;
const bool kKeyBiasByName = kBf16Operands && !kEmulated;
bool IsKeyBias(const std::string& name) { return absl::EndsWith(name, "attn.wk.bias"); }
const double kZeroGradBound = kBf16 ? kAtol : kZeroGrad;

// AdamW with eps = 1e-8 makes the first update lr * g / (|g| + 1e-8) ~ lr * sign(g), a
// discontinuous function of g that turns the noise of a zero gradient (above) into +-lr. eps =
// 0.1, about the size of the gradients here, makes the update smooth in g (Lipschitz constant
// lr / eps), so that parity of the gradients implies parity of the update. The AdamW op itself
// is checked at eps = 1e-8 with identical inputs in backend_parity_test.cc.
constexpr float kLr = 1e-2f, kAdamEps = 0.1f;

// Passes when |got - want| <= kAtol * scale + kRtol * |want| for all n elements (scale: max|want|
// unless given); otherwise names the worst element.
::testing::AssertionResult Close(const float* got, const float* want, size_t n, double scale = -1) {
  if (scale < 0) {
    scale = 0;
    for (size_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  size_t bad = 0, worst_i = 0;
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double bound = kAtol * scale + kRtol * std::fabs(static_cast<double>(want[i]));
    if (err <= bound) continue;
    const double ratio = bound > 0 && !std::isnan(err) ? err / bound : INFINITY;
    if (bad++ == 0 || ratio > worst) worst = ratio, worst_i = i;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << std::setprecision(9) << bad << " of " << n << " elements differ; worst [" << worst_i
         << "]: got " << got[worst_i] << ", want " << want[worst_i] << " (" << worst
         << "x the bound " << kAtol << " * " << scale << " + " << kRtol << " |want|)";
}

double MaxAbs(const float* x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(x[i])));
  return m;
}

::testing::AssertionResult CloseScalar(double got, double want) {
  if (std::fabs(got - want) <= kRtol * std::fabs(want)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << std::setprecision(12) << "got " << got << ", want " << want;
}

std::vector<float> ToHost(Backend* be, const float* p, size_t n) {
  std::vector<float> h(n);
  be->Synchronize();
  be->CopyToHost(h.data(), p, n * sizeof(float));
  return h;
}

// Everything one training step produces, copied to the host (arenas in ParamStore layout).
struct StepResult {
  LossReport loss;        // forward + backward
  LossReport loss_after;  // forward only, after the AdamW step
  double grad_norm = 0;
  std::vector<float> grads, params, m, v;
};

struct Batch {
  int b = 2, t = 9;
  std::vector<int32_t> ids, targets;
  std::vector<float> mask, exit_weights;
};

// One step of `c` on `be` from the parameter arena `init`.
StepResult TrainStep(Backend* be, const ModelConfig& c, const std::vector<float>& init,
                     const Batch& batch) {
  StepResult r;
  auto model = Model::Create(c, be);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return r;
  ParamStore& ps = (*model)->params();
  be->CopyFromHost(ps.params_data(), init.data(), init.size() * sizeof(float));
  auto ws = (*model)->MakeWorkspace(batch.b, batch.t);
  ps.ZeroGrads();
  r.loss = (*model)->ForwardBackward(*ws, batch.ids.data(), batch.targets.data(), batch.mask.data(),
                                     batch.exit_weights, true);
  r.grads = ToHost(be, ps.grads_data(), ps.padded_size());
  AdamWConfig ac;
  ac.eps = kAdamEps;
  ac.grad_clip = 1.0f;
  AdamW opt(&ps, ac);
  r.grad_norm = opt.Step(kLr);
  r.params = ToHost(be, ps.params_data(), ps.padded_size());
  r.m = ToHost(be, opt.m(), ps.padded_size());
  r.v = ToHost(be, opt.v(), ps.padded_size());
  r.loss_after = (*model)->ForwardBackward(*ws, batch.ids.data(), batch.targets.data(),
                                           batch.mask.data(), batch.exit_weights, false);
  return r;
}

class ModelParity : public testing::DeviceParityTest {
 protected:
  // Runs one step on both backends from the same random parameters and compares everything.
  void ExpectStepParity(const ModelConfig& c, uint64_t seed) {
    ASSERT_EQ(dev_->operand_dtype() == DType::kBF16, kBf16Operands) << dev_->name();
    auto cpu = MakeBackend("cpu");
    ASSERT_TRUE(cpu.ok());
    std::unique_ptr<Backend> ref = std::move(*cpu);
    if (kBf16Operands)
      ref = std::make_unique<testing::Bf16ReferenceBackend>(
          std::move(ref), [](int d) { return d == 32 || d == 64 || d == 128; },
          testing::ParityBackendRunsEmulatedCudnnGraphs);
    auto ref_model = Model::Create(c, ref.get());
    ASSERT_TRUE(ref_model.ok()) << ref_model.status();
    testing::FillParams(**ref_model, seed);
    const ParamStore& ps = (*ref_model)->params();
    const std::vector<float> init(ps.params_data(), ps.params_data() + ps.padded_size());

    Batch batch;
    const int n = batch.b * batch.t;
    batch.ids = testing::RandomTokens(n, c.vocab_size, seed + 1);
    batch.targets = testing::RandomTokens(n, c.vocab_size, seed + 2);
    batch.mask.assign(n, 1.0f);
    batch.mask[4] = batch.mask[13] = 0.0f;  // masked positions
    for (size_t i = 0; i < c.exits.size(); ++i) batch.exit_weights.push_back(0.5f - 0.2f * i);

    const StepResult want = TrainStep(ref.get(), c, init, batch);
    const StepResult got = TrainStep(dev_, c, init, batch);
    ASSERT_EQ(got.grads.size(), want.grads.size());

    EXPECT_TRUE(CloseScalar(got.loss.final_loss, want.loss.final_loss)) << "final loss";
    EXPECT_TRUE(CloseScalar(got.loss.objective, want.loss.objective)) << "objective";
    ASSERT_EQ(got.loss.exit_losses.size(), c.exits.size());
    for (size_t i = 0; i < c.exits.size(); ++i) {
      EXPECT_TRUE(CloseScalar(got.loss.exit_losses[i], want.loss.exit_losses[i]))
          << "exit " << i << " loss";
      EXPECT_TRUE(CloseScalar(got.loss_after.exit_losses[i], want.loss_after.exit_losses[i]))
          << "exit " << i << " loss after the step";
    }
    EXPECT_TRUE(CloseScalar(got.grad_norm, want.grad_norm)) << "gradient norm";
    EXPECT_TRUE(CloseScalar(got.loss_after.final_loss, want.loss_after.final_loss))
        << "final loss after the step";
    // The step moved the model (the comparison after it is not vacuous).
    EXPECT_LT(want.loss_after.objective, want.loss.objective - 1e-3);

    const double gmax = MaxAbs(want.grads.data(), want.grads.size());
    int compared = 0;
    for (const ParamInfo& p : ps.params()) {
      SCOPED_TRACE(p.name);
      const size_t o = p.offset, numel = p.numel;
      if (MaxAbs(&want.grads[o], numel) < kZeroGrad * gmax ||
          (kKeyBiasByName && IsKeyBias(p.name))) {
        EXPECT_LT(MaxAbs(&got.grads[o], numel), kZeroGradBound * gmax)
            << "gradient, zero on the CPU";
      } else {
        EXPECT_TRUE(Close(&got.grads[o], &want.grads[o], numel)) << "gradient";
        EXPECT_TRUE(Close(&got.m[o], &want.m[o], numel)) << "AdamW m";
        EXPECT_TRUE(Close(&got.v[o], &want.v[o], numel)) << "AdamW v";
        ++compared;
      }
      EXPECT_TRUE(Close(&got.params[o], &want.params[o], numel)) << "updated parameter";
      // The update p - p0 on the scale of an AdamW update, lr.
      std::vector<float> got_update(numel), want_update(numel);
      for (size_t k = 0; k < numel; ++k) {
        got_update[k] = got.params[o + k] - init[o + k];
        want_update[k] = want.params[o + k] - init[o + k];
      }
      EXPECT_TRUE(Close(got_update.data(), want_update.data(), numel, kLr)) << "AdamW update";
    }
    EXPECT_GE(compared, static_cast<int>(ps.params().size()) - c.num_layers);
  }
};

ExitConfig Exit(int layer, ExitKind kind, ExitPosition position, bool tied) {
  ExitConfig x;
  x.layer = layer;
  x.kind = kind;
  x.position = position;
  x.tied = tied;
  return x;
}

// A 3-layer model with vocabulary 37 and `heads` query heads of head_dim hidden / heads; Llama
// shares each KV head between two query heads. FFN 5/4 of the hidden size.
ModelConfig ParityConfig(ModelStyle style, int hidden, int heads) {
  ModelConfig c = testing::TinyConfig(style);
  c.vocab_size = 37;
  c.hidden_size = hidden;
  c.num_heads = heads;
  c.num_kv_heads = style == ModelStyle::kLlama ? heads / 2 : heads;
  c.ffn_hidden_size = hidden * 5 / 4;
  return c;
}

// Hidden 32 with 4 query heads (head_dim 8), FFN 40: sizes that are not multiples of 32 except
// the hidden size.
ModelConfig SmallConfig(ModelStyle style) { return ParityConfig(style, 32, 4); }

TEST_F(ModelParity, LlamaGqaTrainingStepWithExits) {
  ModelConfig c = SmallConfig(ModelStyle::kLlama);
  c.exits = {Exit(1, ExitKind::kNorm, ExitPosition::kPost, false),
             Exit(3, ExitKind::kBlock, ExitPosition::kPre, true)};
  ExpectStepParity(c, 11);
}

TEST_F(ModelParity, GptTrainingStepWithExits) {
  ModelConfig c = SmallConfig(ModelStyle::kGpt);
  c.confidence_weighted_exit_loss = true;  // uses the max probabilities of CrossEntropy
  c.exits = {Exit(1, ExitKind::kLinear, ExitPosition::kPost, true),
             Exit(2, ExitKind::kMlp, ExitPosition::kPost, false)};
  c.exits[1].temperature = 1.5f;  // its logits are divided (Scale) before the cross-entropy
  ExpectStepParity(c, 12);
}

// Head dimension 32 (2 query heads over 1 KV head; GPT: 2 over 2), FFN 80: the size the fused
// attention kernels take (on bf16 backends), so that their forward and backward run inside a
// whole step, fed and read by the other ops in the model's layouts.
ModelConfig FusedAttentionConfig(ModelStyle style) { return ParityConfig(style, 64, 2); }

// Backends with bf16 GEMMs on fp32 operands (cuda-bf16) skip them: nothing mirrors the
// roundings of that mode, and against the fp32 CPU its noise at this size passes 1e-1.
#define SKIP_WITHOUT_ROUNDING_REFERENCE()                      \
  if (kBf16 && !kBf16Operands)                                 \
  GTEST_SKIP() << "bf16 GEMMs on fp32 operands: no reference " \
                  "that rounds as they do (see cuda-bf16w)"

TEST_F(ModelParity, LlamaHeadDim32TrainingStepWithExits) {
  SKIP_WITHOUT_ROUNDING_REFERENCE();
  ModelConfig c = FusedAttentionConfig(ModelStyle::kLlama);
  c.exits = {Exit(2, ExitKind::kMlp, ExitPosition::kPost, false)};
  ExpectStepParity(c, 13);
}

TEST_F(ModelParity, GptHeadDim32TrainingStepWithExits) {
  SKIP_WITHOUT_ROUNDING_REFERENCE();
  ModelConfig c = FusedAttentionConfig(ModelStyle::kGpt);
  c.exits = {Exit(1, ExitKind::kNorm, ExitPosition::kPre, true)};
  ExpectStepParity(c, 14);
}

// Head dimension 64 (hidden 256; Llama 4 query heads over 2 KV heads, GPT 2 over 2): the size
// cuDNN's attention graphs are offered, so that on cuda-bf16w under the emulation they run inside
// a whole step, on the fused q, k, v rows one GEMM projects, against the reference that rounds as
// they do (it matched within 2e-7; with the fused kernels' roundings instead, 34x past 2e-3, and
// with the backward's scale left out of the graph's dS, 4e4x). Skipped on cuda-bf16w
// - on a GPU: the step runs cuDNN's own kernels, which round as neither reference does, and this
//   tiny random model amplifies each flipped rounding (the interpreter's graphs against the fused
//   kernels' reference came 1.2x past even the bf16 bound); OperandParity holds each pass there;
// - with EELLM_CUDNN_ATTENTION=0: the fused kernels run it, whose step is held at head dim 32
//   (above); at 64 the noise of GPT's key-bias gradient (zero in exact arithmetic), summed in
//   their tile order, came 1.3x past 2e-3 of the reference's.
#define SKIP_WITHOUT_CUDNN_GRAPHS_ON_BF16W()                                                     \
  if (kBf16Operands && !kEmulatedCudnn)                                                          \
  GTEST_SKIP() << (kEmulated || testing::CudnnAttentionOff()                                     \
                       ? "EELLM_CUDNN_ATTENTION=0: the fused kernels' step is held at head dim " \
                         "32"                                                                    \
                       : "head dim 64 runs cuDNN's kernels on a GPU: no reference rounds as "    \
                         "they do (OperandParity checks each pass)")

TEST_F(ModelParity, LlamaHeadDim64TrainingStepWithExits) {
  SKIP_WITHOUT_ROUNDING_REFERENCE();
  SKIP_WITHOUT_CUDNN_GRAPHS_ON_BF16W();
  ModelConfig c = ParityConfig(ModelStyle::kLlama, 256, 4);
  c.exits = {Exit(1, ExitKind::kNorm, ExitPosition::kPost, false)};
  ExpectStepParity(c, 15);
}

TEST_F(ModelParity, GptHeadDim64TrainingStepWithExits) {
  SKIP_WITHOUT_ROUNDING_REFERENCE();
  SKIP_WITHOUT_CUDNN_GRAPHS_ON_BF16W();
  ModelConfig c = ParityConfig(ModelStyle::kGpt, 128, 2);
  c.exits = {Exit(2, ExitKind::kMlp, ExitPosition::kPost, true)};
  ExpectStepParity(c, 16);
}

}  // namespace
}  // namespace eellm
