// Finite-difference gradient checks of the whole model (final head + exits of every kind, pre
// and post, tied and untied, GPT and Llama styles), and the zero-exit-weight equivalence.
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>

#include "engine/profiling_backend.h"
#include "models/exit_loss_weights.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::Cpu;
using testing::TinyConfig;

// Checks d(objective)/d(param) along a random direction for every parameter tensor.
// Tolerance: |fd - analytic| <= 2e-3 + 3e-2 |analytic| with eps 1e-2 in fp32 (the central
// difference's rounding noise is ~1e-4 at losses ~2.5; truncation error is O(eps^2)).
// `dropout` > 0: with hidden dropout (its masks are fixed by their coordinates, so the objective
// stays a smooth function of the parameters).
void CheckModelGradients(const ModelConfig& c, uint64_t seed, float dropout = 0) {
  auto be = Cpu();
  auto model = *Model::Create(c, be.get());
  testing::FillParams(*model, seed);
  const int b = 2, t = 5, n = b * t;
  if (dropout > 0) model->set_hidden_dropout(dropout, seed + 4);
  auto ws = model->MakeWorkspace(b, t);
  ws->dropout_row0 = dropout > 0 ? 35 : -1;
  auto ids = testing::RandomTokens(n, c.vocab_size, seed + 1);
  auto tg = testing::RandomTokens(n, c.vocab_size, seed + 2);
  std::vector<float> mask(n, 1.0f);
  mask[3] = 0.0f;  // a masked position must not contribute
  std::vector<float> w;
  for (size_t i = 0; i < c.exits.size(); ++i) w.push_back(0.7f + 0.3f * i);
  ParamStore& ps = model->params();
  ps.ZeroGrads();
  LossReport r = model->ForwardBackward(*ws, ids.data(), tg.data(), mask.data(), w, true);
  ASSERT_TRUE(std::isfinite(r.objective));
  for (size_t i = 0; i < c.exits.size(); ++i) EXPECT_GT(r.exit_losses[i], 0.1);
  Rng rng(seed + 3);
  int checked = 0;
  for (int p = 0; p < static_cast<int>(ps.params().size()); ++p) {
    const ParamInfo& info = ps.params()[p];
    std::vector<float> u(info.numel);
    double norm = 0;
    for (auto& x : u) {
      x = static_cast<float>(rng.Normal());
      norm += x * x;
    }
    double analytic = 0;
    for (size_t k = 0; k < info.numel; ++k) {
      u[k] /= std::sqrt(norm);
      analytic += u[k] * ps.grad(p)[k];
    }
    const float eps = 1e-2f;
    std::vector<float> orig(ps.param(p), ps.param(p) + info.numel);
    auto loss_at = [&](float s) {
      for (size_t k = 0; k < info.numel; ++k) ps.param(p)[k] = orig[k] + s * u[k];
      return model->ForwardBackward(*ws, ids.data(), tg.data(), mask.data(), w, false).objective;
    };
    const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
    std::copy(orig.begin(), orig.end(), ps.param(p));
    EXPECT_NEAR(fd, analytic, 2e-3 + 3e-2 * std::fabs(analytic)) << info.name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(ps.params().size()));
}

using ExitCase = std::tuple<ModelStyle, ExitKind, ExitPosition, bool>;

class ModelGradTest : public ::testing::TestWithParam<ExitCase> {};

TEST_P(ModelGradTest, FiniteDifferences) {
  auto [style, kind, position, tied] = GetParam();
  ModelConfig c = TinyConfig(style);
  ExitConfig x;
  x.layer = 2;
  x.kind = kind;
  x.position = position;
  x.tied = tied;
  c.exits.push_back(x);
  // A second exit at a different depth exercises exits on several layers.
  ExitConfig y;
  y.layer = position == ExitPosition::kPost ? 1 : 3;
  y.kind = ExitKind::kNorm;
  y.position = position;
  y.tied = !tied;
  y.temperature = 0.6f;  // its loss is that of logits / 0.6
  c.exits.push_back(y);
  std::sort(c.exits.begin(), c.exits.end(),
            [](const ExitConfig& a, const ExitConfig& b) { return a.depth() < b.depth(); });
  CheckModelGradients(c, 42);
}

INSTANTIATE_TEST_SUITE_P(AllExitKinds, ModelGradTest,
                         ::testing::Combine(::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama),
                                            ::testing::Values(ExitKind::kLinear, ExitKind::kNorm,
                                                              ExitKind::kMlp, ExitKind::kBlock),
                                            ::testing::Values(ExitPosition::kPost,
                                                              ExitPosition::kPre),
                                            ::testing::Bool()));

// Hidden dropout (every branch output of layers and exits, and the embedding) is
// differentiated through its masks; a workspace without dropout_row0 (evaluation) drops nothing.
TEST(ModelGrad, HiddenDropoutThroughLayersExitsAndEmbedding) {
  for (ModelStyle style : {ModelStyle::kGpt, ModelStyle::kLlama}) {
    const ModelConfig c = testing::ConfigWithExits(style);
    CheckModelGradients(c, 21, 0.3f);
    auto be = Cpu();
    auto plain = *Model::Create(c, be.get());
    auto dropped = *Model::Create(c, be.get());
    testing::FillParams(*plain, 5);
    testing::FillParams(*dropped, 5);
    dropped->set_hidden_dropout(0.3f, 9);
    auto wp = plain->MakeWorkspace(2, 5);
    auto wd = dropped->MakeWorkspace(2, 5);
    const auto ids = testing::RandomTokens(10, c.vocab_size, 1);
    const auto tg = testing::RandomTokens(10, c.vocab_size, 2);
    const std::vector<float> w(c.exits.size(), 0.5f);
    const LossReport p = plain->ForwardBackward(*wp, ids.data(), tg.data(), nullptr, w, false);
    const LossReport e = dropped->ForwardBackward(*wd, ids.data(), tg.data(), nullptr, w, false);
    EXPECT_EQ(p.objective, e.objective);  // dropout_row0 -1: evaluation
    wd->dropout_row0 = 0;
    const LossReport d0 = dropped->ForwardBackward(*wd, ids.data(), tg.data(), nullptr, w, false);
    EXPECT_NE(p.final_loss, d0.final_loss);
    for (size_t i = 0; i < c.exits.size(); ++i) EXPECT_NE(p.exit_losses[i], d0.exit_losses[i]);
    wd->dropout_row0 = 10;  // other rows: other masks
    const LossReport d1 = dropped->ForwardBackward(*wd, ids.data(), tg.data(), nullptr, w, false);
    EXPECT_NE(d0.final_loss, d1.final_loss);
  }
}

TEST(ModelGrad, NoExitsBothStyles) {
  CheckModelGradients(TinyConfig(ModelStyle::kGpt), 7);
  CheckModelGradients(TinyConfig(ModelStyle::kLlama), 8);
}

// Calls per GEMM shape (ProfilingBackend's keys) of one training step of b = 2 sequences of 5.
std::map<std::string, int64_t> GemmCallsOfAStep(const ModelConfig& c) {
  auto cpu = Cpu();
  ProfilingBackend prof(cpu.get());
  auto model = *Model::Create(c, &prof);
  testing::FillParams(*model, 3);
  auto ws = model->MakeWorkspace(2, 5);
  auto ids = testing::RandomTokens(10, c.vocab_size, 4);
  auto tg = testing::RandomTokens(10, c.vocab_size, 5);
  std::vector<float> mask(10, 1.0f);
  prof.set_timing(true);
  model->ForwardBackward(*ws, ids.data(), tg.data(), mask.data(), {}, true);
  std::map<std::string, int64_t> calls;
  for (const auto& [key, stats] : prof.gemm_shapes()) calls[key] = stats.calls;
  return calls;
}
// Whether the projections may fuse (models/layers.cc; ctest also runs these tests with
// EELLM_FUSED_PROJECTIONS=0).
bool FusionAllowed() {
  const char* env = std::getenv("EELLM_FUSED_PROJECTIONS");
  return env == nullptr || std::string(env) != "0";
}
int64_t CallsStartingWith(const std::map<std::string, int64_t>& calls, const std::string& prefix) {
  int64_t n = 0;
  for (const auto& [key, count] : calls) n += key.rfind(prefix, 0) == 0 ? count : 0;
  return n;
}

// SwiGLU's gate and up projections run as one GEMM of [10, 2f] outputs where their weights lie
// one after another in the parameter arena (f * hidden a multiple of 16, the arena's alignment),
// and as two GEMMs of [10, f] otherwise (or with EELLM_FUSED_PROJECTIONS=0); the gradients are
// right both ways.
TEST(ModelGrad, GateAndUpInOneGemmWhereTheirWeightsAreConsecutive) {
  const ModelConfig one = TinyConfig(ModelStyle::kLlama);  // f 12, hidden 8: 96 elements
  std::map<std::string, int64_t> calls = GemmCallsOfAStep(one);
  const int fused = FusionAllowed() ? one.num_layers : 0;
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 24 <- 8,"), fused);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 24 <- 8,"), fused);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 12 <- 8,"), 2 * (one.num_layers - fused));
  CheckModelGradients(one, 11);

  ModelConfig two = one;
  two.ffn_hidden_size = 13;  // 104 elements: the up projection's weight starts 8 floats later
  calls = GemmCallsOfAStep(two);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 26 <- 8,"), 0);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 13 <- 8,"), 2 * two.num_layers);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 13 <- 8,"), 2 * two.num_layers);
  CheckModelGradients(two, 12);
}

// q, k and v are projected by one GEMM of (hq + 2 hkv) d columns, and their gradients (dq, dk,
// dv) go to the norm's input through one such GEMM, where the three weights, and biases if any,
// lie one after another in the arena and no q and k norms come between; three GEMMs each way
// otherwise.
TEST(ModelGrad, QkvInOneGemmWhereTheirWeightsAreConsecutive) {
  const ModelConfig llama = TinyConfig(ModelStyle::kLlama);  // q 8, k and v 4 columns of 8
  std::map<std::string, int64_t> calls = GemmCallsOfAStep(llama);
  const int fused = FusionAllowed() ? llama.num_layers : 0;
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 16 <- 8,"), fused);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 16 <- 8,"), fused);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 4 <- 8,"), 2 * (llama.num_layers - fused));
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 4 <- 8,"),
            2 * (llama.num_layers - fused));

  ModelConfig gpt = TinyConfig(ModelStyle::kGpt);  // biases of 8 floats: 16-float aligned apart
  calls = GemmCallsOfAStep(gpt);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 24 <- 8,"), 0);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 24 <- 8,"), 0);
  gpt.hidden_size = 16;  // biases of 16: one after another
  gpt.ffn_hidden_size = 24;
  calls = GemmCallsOfAStep(gpt);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 48 <- 16,"),
            FusionAllowed() ? gpt.num_layers : 0);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 48 <- 16,"),
            FusionAllowed() ? gpt.num_layers : 0);
  CheckModelGradients(gpt, 13);

  ModelConfig qk_norm = llama;
  qk_norm.qk_norm = true;
  calls = GemmCallsOfAStep(qk_norm);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 16 <- 8,"), 0);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 16 <- 8,"), 0);
  EXPECT_EQ(CallsStartingWith(calls, "Linear 10 x 4 <- 8,"), 2 * llama.num_layers);
  EXPECT_EQ(CallsStartingWith(calls, "LinearBackward 10 x 4 <- 8,"), 2 * llama.num_layers);
}

// A tiny Llama with a block exit after layer 1, for checking attention variants in the backbone
// and in an exit alike.
ModelConfig LlamaWithBlockExit() {
  ModelConfig c = TinyConfig(ModelStyle::kLlama);
  ExitConfig x;
  x.layer = 1;
  x.kind = ExitKind::kBlock;
  c.exits.push_back(x);
  return c;
}

// Llama with biases on q, k and v (Qwen2), in the backbone and in a block exit.
TEST(ModelGrad, LlamaWithQkvBiases) {
  ModelConfig c = LlamaWithBlockExit();
  c.qkv_bias = true;
  auto be = Cpu();
  auto m = Model::Create(c, be.get());
  ASSERT_TRUE(m.ok());
  int biases = 0;
  for (const ParamInfo& p : (*m)->params().params()) {
    const bool qkv = p.name.find("attn.wq.bias") != std::string::npos ||
                     p.name.find("attn.wk.bias") != std::string::npos ||
                     p.name.find("attn.wv.bias") != std::string::npos;
    biases += qkv;
    EXPECT_TRUE(qkv || p.name.find("bias") == std::string::npos) << p.name;
  }
  EXPECT_EQ(biases, 3 * (c.num_layers + 1));
  CheckModelGradients(c, 9);
}

// Qwen3: RMSNorm over each q and k head before RoPE, with heads wider than hidden / heads (2
// heads of 6 over a hidden size of 8), in the backbone and in a block exit.
TEST(ModelGrad, LlamaWithQkNormAndWideHeads) {
  ModelConfig c = LlamaWithBlockExit();
  c.qk_norm = true;
  c.explicit_head_dim = 6;
  auto be = Cpu();
  auto m = Model::Create(c, be.get());
  ASSERT_TRUE(m.ok());
  int norms = 0;
  for (const ParamInfo& p : (*m)->params().params()) {
    if (p.name.find("attn.q_norm.weight") != std::string::npos ||
        p.name.find("attn.k_norm.weight") != std::string::npos) {
      ++norms;
      EXPECT_EQ(p.shape, Shape({6})) << p.name;
      EXPECT_TRUE(p.sum_grad_over_tp) << p.name;
    }
    if (p.name.find("attn.wq.weight") != std::string::npos) {
      EXPECT_EQ(p.shape, Shape({12, 8})) << p.name;
    }
  }
  EXPECT_EQ(norms, 2 * (c.num_layers + 1));
  CheckModelGradients(c, 11);
}

TEST(ModelGrad, PreExitAtLayerOneReadsEmbeddings) {
  ModelConfig c = TinyConfig(ModelStyle::kLlama);
  ExitConfig x;
  x.layer = 1;
  x.position = ExitPosition::kPre;
  x.kind = ExitKind::kMlp;
  c.exits.push_back(x);
  CheckModelGradients(c, 9);
}

// A model whose exits all have weight 0 gives exactly the gradients of the same backbone
// without exits, and zero gradients for the exit parameters.
TEST(ModelGrad, ZeroExitWeightsMatchModelWithoutExits) {
  for (ModelStyle style : {ModelStyle::kGpt, ModelStyle::kLlama}) {
    ModelConfig base = TinyConfig(style);
    ModelConfig with = base;
    for (auto [layer, kind, pos] : {std::tuple{1, ExitKind::kMlp, ExitPosition::kPost},
                                    std::tuple{3, ExitKind::kBlock, ExitPosition::kPre}}) {
      ExitConfig x;
      x.layer = layer;
      x.kind = kind;
      x.position = pos;
      x.tied = true;
      with.exits.push_back(x);
    }
    auto be = Cpu();
    auto a = *Model::Create(base, be.get());
    auto m = *Model::Create(with, be.get());
    testing::FillParams(*m, 5);
    testing::CopyParamsByName(*m, *a);
    auto ws_a = a->MakeWorkspace(2, 6);
    auto ws_m = m->MakeWorkspace(2, 6);
    auto ids = testing::RandomTokens(12, base.vocab_size, 1);
    auto tg = testing::RandomTokens(12, base.vocab_size, 2);
    a->params().ZeroGrads();
    m->params().ZeroGrads();
    LossReport ra = a->ForwardBackward(*ws_a, ids.data(), tg.data(), nullptr, {}, true);
    std::vector<float> zero(2, 0.0f);
    LossReport rm = m->ForwardBackward(*ws_m, ids.data(), tg.data(), nullptr, zero, true);
    EXPECT_EQ(ra.final_loss, rm.final_loss);
    EXPECT_EQ(ra.objective, rm.objective);
    EXPECT_GT(rm.exit_losses[0], 0.5);  // exit losses are still reported
    for (const ParamInfo& p : m->params().params()) {
      const float* g = m->params().grad(m->params().Find(p.name));
      int j = a->params().Find(p.name);
      double max_abs = 0;
      for (size_t k = 0; k < p.numel; ++k) {
        if (j >= 0) {
          ASSERT_EQ(g[k], a->params().grad(j)[k]) << p.name << "[" << k << "]";
        }
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(g[k])));
      }
      if (j < 0)
        EXPECT_EQ(max_abs, 0.0) << p.name;
      else
        EXPECT_GT(max_abs, 0.0) << p.name;
    }
  }
}

// EE-Tuning (StageTuneExits): after the forward, the exits' own parameters get exactly the
// gradients full training gives them (they come from their exit losses alone), the backbone's
// get none (the word embedding only through exits tied to it), and every head's loss is as in
// full training; the objective counts the exits alone.
TEST(ModelGrad, TuneExitsGivesTheExitGradientsOfFullTraining) {
  for (ModelStyle style : {ModelStyle::kGpt, ModelStyle::kLlama}) {
    const ModelConfig c = testing::ConfigWithExits(style);  // block, MLP and norm exits
    auto be = Cpu();
    auto m = *Model::Create(c, be.get());
    testing::FillParams(*m, 11);
    auto ws = m->MakeWorkspace(2, 6);
    auto ids = testing::RandomTokens(12, c.vocab_size, 3);
    auto tg = testing::RandomTokens(12, c.vocab_size, 4);
    const std::vector<float> w = {0.5f, 0.8f, 1.3f};
    ParamStore& ps = m->params();
    ps.ZeroGrads();
    const LossReport full = m->ForwardBackward(*ws, ids.data(), tg.data(), nullptr, w, true);
    std::vector<std::vector<float>> full_grads;
    for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
      full_grads.emplace_back(ps.grad(i), ps.grad(i) + ps.params()[i].numel);
    }
    ps.ZeroGrads();
    m->StageForward(*ws, ids.data(), nullptr);
    const LossReport tuned = m->StageTuneExits(*ws, tg.data(), nullptr, w, 1.0f);
    EXPECT_DOUBLE_EQ(tuned.final_loss, full.final_loss);
    double exit_terms = 0;
    for (size_t e = 0; e < c.exits.size(); ++e) {
      EXPECT_DOUBLE_EQ(tuned.exit_losses[e], full.exit_losses[e]) << "exit " << e;
      exit_terms += w[e] * full.exit_losses[e];
    }
    EXPECT_NEAR(tuned.objective, exit_terms, 1e-6 * exit_terms);
    int exit_tensors = 0;
    for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
      const ParamInfo& p = ps.params()[i];
      const bool exit_param = Model::IsExitTensor(p.name);
      double max_abs = 0, max_diff = 0;
      for (size_t k = 0; k < p.numel; ++k) {
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(full_grads[i][k])));
        max_diff =
            std::max(max_diff, static_cast<double>(std::fabs(ps.grad(i)[k] - full_grads[i][k])));
      }
      if (exit_param) {
        ++exit_tensors;
        EXPECT_GT(max_abs, 0.0) << p.name;
        EXPECT_LE(max_diff, 1e-5 * max_abs) << p.name;
      } else if (i != m->word_embedding()) {
        for (size_t k = 0; k < p.numel; ++k) ASSERT_EQ(ps.grad(i)[k], 0.0f) << p.name;
      }
    }
    EXPECT_GE(exit_tensors, 8) << "block, MLP and norm exits with their own heads";
  }
}

// Gradients add up over microbatches: one call on 4 sequences equals four calls on one
// sequence each (loss scale 1/4) through the same workspace, for every exit kind and both
// styles. (The pipeline's microbatching relies on it; a buffer that keeps state from the last
// microbatch breaks it without changing any single call's gradient.)
TEST(ModelGrad, MicrobatchesAddUp) {
  for (auto [style, block_layer] : {std::pair{ModelStyle::kGpt, 1},
                                    {ModelStyle::kLlama, 1},
                                    {ModelStyle::kGpt, 3},
                                    {ModelStyle::kLlama, 3}}) {
    ModelConfig c = testing::ConfigWithExits(style);  // block, MLP and norm exits
    // The block exit before layer 1 (reading the embeddings), or after layer 3 (with the norm
    // exit moved before layer 3).
    if (block_layer == 3) {
      c.exits[0].layer = 3;
      c.exits[0].position = ExitPosition::kPost;
      c.exits[2].position = ExitPosition::kPre;
      std::swap(c.exits[0], c.exits[2]);
      std::swap(c.exits[0], c.exits[1]);
    }
    auto be = Cpu();
    auto m = *Model::Create(c, be.get());
    testing::FillParams(*m, 21);
    const int b = 4, t = 6;
    auto ids = testing::RandomTokens(b * t, c.vocab_size, 5);
    auto tg = testing::RandomTokens(b * t, c.vocab_size, 6);
    const std::vector<float> w = {0.5f, 0.8f, 1.3f};
    ParamStore& ps = m->params();
    auto whole = m->MakeWorkspace(b, t);
    ps.ZeroGrads();
    m->ForwardBackward(*whole, ids.data(), tg.data(), nullptr, w, true);
    const std::vector<float> one(ps.grads_data(), ps.grads_data() + ps.size());
    auto ws = m->MakeWorkspace(1, t);
    ps.ZeroGrads();
    for (int r = 0; r < b; ++r) {
      m->ForwardBackward(*ws, ids.data() + r * t, tg.data() + r * t, nullptr, w, true, 1.0f / b);
    }
    for (const ParamInfo& p : ps.params()) {
      double max_abs = 0, max_diff = 0;
      for (size_t k = p.offset; k < p.offset + p.numel; ++k) {
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(one[k])));
        max_diff = std::max(max_diff, static_cast<double>(std::fabs(ps.grads_data()[k] - one[k])));
      }
      EXPECT_LE(max_diff, 1e-5 * max_abs + 1e-7)
          << (style == ModelStyle::kGpt ? "gpt " : "llama ") << "block exit at " << block_layer
          << ": " << p.name;
    }
  }
}

TEST(ExitLossWeights, LinearAndCosineWarmup) {
  ModelConfig c = TinyConfig(ModelStyle::kGpt, 4);
  ExitConfig lin;
  lin.layer = 1;
  lin.loss_weight_init = 0.1f;
  lin.loss_weight = 0.5f;
  lin.loss_weight_warmup_iters = 100;
  ExitConfig cos = lin;
  cos.layer = 2;
  cos.loss_weight_warmup = WarmupStyle::kCosine;
  ExitConfig flat;
  flat.layer = 3;
  flat.loss_weight = flat.loss_weight_init = 0.25f;
  c.exits = {lin, cos, flat};
  auto w0 = ExitLossWeights(c, 0);
  EXPECT_FLOAT_EQ(w0[0], 0.1f);
  EXPECT_FLOAT_EQ(w0[1], 0.1f);
  EXPECT_FLOAT_EQ(w0[2], 0.25f);
  auto w25 = ExitLossWeights(c, 25);
  EXPECT_FLOAT_EQ(w25[0], 0.2f);                                          // 0.1 + 0.4 * 0.25
  EXPECT_NEAR(w25[1], 0.1 + 0.4 * 0.5 * (1 - std::cos(M_PI / 4)), 1e-6);  // ~0.1586
  auto w50 = ExitLossWeights(c, 50);
  EXPECT_FLOAT_EQ(w50[0], 0.3f);
  EXPECT_FLOAT_EQ(w50[1], 0.3f);  // cosine ramp crosses the midpoint at half way
  for (int s : {100, 1000}) {
    auto w = ExitLossWeights(c, s);
    EXPECT_FLOAT_EQ(w[0], 0.5f);
    EXPECT_FLOAT_EQ(w[1], 0.5f);
    EXPECT_FLOAT_EQ(w[2], 0.25f);
  }
}

// A tiny model with one exit, after layer 1 (a), and the same model with the same parameters
// whose exit loss is weighted by confidence (b).
struct ConfidencePair {
  std::unique_ptr<Backend> be;  // (outlives the models)
  std::unique_ptr<Model> a, b;
};
ConfidencePair MakeConfidencePair(ModelStyle style, uint64_t seed) {
  ModelConfig c = TinyConfig(style);
  ExitConfig x;
  x.layer = 1;
  c.exits = {x};
  ModelConfig cw = c;
  cw.confidence_weighted_exit_loss = true;
  ConfidencePair p;
  p.be = Cpu();
  p.a = *Model::Create(c, p.be.get());
  p.b = *Model::Create(cw, p.be.get());
  testing::FillParams(*p.a, seed);
  testing::CopyParamsByName(*p.a, *p.b);
  return p;
}

// Confidence weighting scales each token's exit loss by that exit's detached max probability:
// the objective term equals w * mean(max_prob * CE), which is below w * mean(CE).
TEST(ModelLoss, ConfidenceWeightedExitLoss) {
  auto [be, a, b] = MakeConfidencePair(ModelStyle::kGpt, 3);
  const ModelConfig& c = a->config();
  auto wa = a->MakeWorkspace(1, 8);
  auto wb = b->MakeWorkspace(1, 8);
  auto ids = testing::RandomTokens(8, c.vocab_size, 4);
  auto tg = testing::RandomTokens(8, c.vocab_size, 5);
  std::vector<float> w = {0.5f};
  LossReport ra = a->ForwardBackward(*wa, ids.data(), tg.data(), nullptr, w, false);
  LossReport rb = b->ForwardBackward(*wb, ids.data(), tg.data(), nullptr, w, false);
  EXPECT_DOUBLE_EQ(ra.exit_losses[0], rb.exit_losses[0]);
  EXPECT_DOUBLE_EQ(ra.final_loss, rb.final_loss);
  const double term_a = ra.objective - ra.final_loss, term_b = rb.objective - rb.final_loss;
  EXPECT_NEAR(term_a, 0.5 * ra.exit_losses[0], 1e-5);
  EXPECT_GT(term_b, 0.0);
  EXPECT_LT(term_b, term_a);
}

// Its gradient treats the max probability as a constant: with one unmasked position, whose
// confidence p the report gives (term / (w * loss)), it is the gradient of the unweighted model
// whose exit weight is w p.
TEST(ModelLoss, ConfidenceWeightedGradientIsThatOfTheDetachedWeight) {
  auto [be, a, b] = MakeConfidencePair(ModelStyle::kLlama, 21);
  const ModelConfig& c = a->config();
  const int t = 8;
  auto wa = a->MakeWorkspace(1, t);
  auto wb = b->MakeWorkspace(1, t);
  auto ids = testing::RandomTokens(t, c.vocab_size, 22);
  auto tg = testing::RandomTokens(t, c.vocab_size, 23);
  std::vector<float> mask(t, 0.0f);
  mask[5] = 1.0f;
  const float w = 0.75f;
  b->params().ZeroGrads();
  const LossReport rb = b->ForwardBackward(*wb, ids.data(), tg.data(), mask.data(), {w}, true);
  const double p = (rb.objective - rb.final_loss) / (w * rb.exit_losses[0]);
  ASSERT_GT(p, 1.0 / c.vocab_size);
  ASSERT_LT(p, 1.0);
  a->params().ZeroGrads();
  const LossReport ra = a->ForwardBackward(*wa, ids.data(), tg.data(), mask.data(),
                                           {static_cast<float>(w * p)}, true);
  EXPECT_NEAR(ra.objective, rb.objective, 1e-6 * std::fabs(rb.objective));
  int exit_grads = 0;
  for (const ParamInfo& info : a->params().params()) {
    const int j = b->params().Find(info.name);
    ASSERT_GE(j, 0) << info.name;
    const float *ga = a->params().grad(a->params().Find(info.name)), *gb = b->params().grad(j);
    double scale = 0;
    for (size_t k = 0; k < info.numel; ++k) scale = std::max(scale, std::fabs(double{ga[k]}));
    for (size_t k = 0; k < info.numel; ++k) {
      ASSERT_NEAR(gb[k], ga[k], 1e-5 * scale + 1e-9) << info.name << "[" << k << "]";
    }
    if (info.name.rfind("exits.", 0) == 0 && scale > 0) ++exit_grads;
  }
  EXPECT_GT(exit_grads, 0);  // the exit's own parameters have gradients to compare
}

// An exit's temperature T divides its logits in its loss (as EE-LLM trains them): a model with
// T = 2.5 has the loss and gradients of one with T = 1 whose untied exit head is the first's
// divided by 2.5, except the head's own gradient, which is that model's divided by 2.5 (chain
// rule through W / T). Checked with and without confidence weighting (its max probability is
// that of the divided logits too).
TEST(ModelLoss, ExitTemperatureDividesTheLogits) {
  for (bool confidence : {false, true}) {
    ModelConfig c = TinyConfig(ModelStyle::kLlama);
    c.confidence_weighted_exit_loss = confidence;
    ExitConfig x;
    x.layer = 1;
    x.temperature = 2.5f;
    c.exits = {x};
    ModelConfig scaled = c;
    scaled.exits[0].temperature = 1.0f;
    auto be = Cpu();
    auto a = *Model::Create(c, be.get());
    auto b = *Model::Create(scaled, be.get());
    testing::FillParams(*a, 13);
    testing::CopyParamsByName(*a, *b);
    const int head = b->params().Find("exits.0.head.weight");
    ASSERT_GE(head, 0);
    for (size_t k = 0; k < b->params().params()[head].numel; ++k)
      b->params().param(head)[k] /= 2.5f;
    auto wa = a->MakeWorkspace(2, 6);
    auto wb = b->MakeWorkspace(2, 6);
    auto ids = testing::RandomTokens(12, c.vocab_size, 14);
    auto tg = testing::RandomTokens(12, c.vocab_size, 15);
    std::vector<float> w = {0.4f};
    a->params().ZeroGrads();
    b->params().ZeroGrads();
    LossReport ra = a->ForwardBackward(*wa, ids.data(), tg.data(), nullptr, w, true);
    LossReport rb = b->ForwardBackward(*wb, ids.data(), tg.data(), nullptr, w, true);
    EXPECT_NEAR(ra.exit_losses[0], rb.exit_losses[0], 1e-5) << confidence;
    EXPECT_NEAR(ra.objective, rb.objective, 1e-5) << confidence;
    // A temperature changes the loss: divided logits are flatter (losses near log(vocab)).
    auto plain = *Model::Create(scaled, be.get());
    testing::CopyParamsByName(*a, *plain);
    auto wp = plain->MakeWorkspace(2, 6);
    LossReport rp = plain->ForwardBackward(*wp, ids.data(), tg.data(), nullptr, w, false);
    EXPECT_GT(std::fabs(rp.exit_losses[0] - ra.exit_losses[0]), 1e-3) << confidence;
    for (int p = 0; p < static_cast<int>(a->params().params().size()); ++p) {
      const std::string& name = a->params().params()[p].name;
      const int q = b->params().Find(name);
      ASSERT_GE(q, 0) << name;
      const float factor = q == head ? 1.0f / 2.5f : 1.0f;
      double max_err = 0, max_abs = 0;
      for (size_t k = 0; k < a->params().params()[p].numel; ++k) {
        const double ga = a->params().grad(p)[k], gb = b->params().grad(q)[k] * factor;
        max_err = std::max(max_err, std::fabs(ga - gb));
        max_abs = std::max(max_abs, std::fabs(ga));
      }
      EXPECT_LE(max_err, 1e-5 + 1e-4 * max_abs) << name << " confidence " << confidence;
      EXPECT_GT(max_abs, 0.0) << name;
    }
  }
}

}  // namespace
}  // namespace eellm
