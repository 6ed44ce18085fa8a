// Exit surgery (EE-Tuning's add-exits, moving exits pre <-> post) and the ParamStore <->
// HostTensorMap helpers, checked on the logits of the models built from the results.
#include "launch/exit_surgery.h"

#include <cmath>

#include "absl/strings/match.h"
#include "launch/hf_convert.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

using testing::Cpu;

ExitConfig Exit(int layer, ExitKind kind, ExitPosition pos, bool tied = false) {
  ExitConfig x;
  x.layer = layer;
  x.kind = kind;
  x.position = pos;
  x.tied = tied;
  return x;
}

ModelConfig Base(ModelStyle style) {
  ModelConfig c;
  c.style = style;
  c.vocab_size = 29;
  c.hidden_size = 16;
  c.num_layers = 4;
  c.num_heads = 4;
  c.num_kv_heads = style == ModelStyle::kLlama ? 2 : 4;
  c.ffn_hidden_size = 24;
  c.max_seq_len = 16;
  c.tie_embeddings = style == ModelStyle::kGpt;
  return c;
}

// A random whole model for `c` as host tensors.
HostTensorMap RandomTensors(const ModelConfig& c, Backend* be, uint64_t seed) {
  auto m = Model::Create(c, be);
  EXPECT_TRUE(m.ok()) << m.status();
  testing::FillParams(**m, seed, 0.3f);
  return ParamsToHost((*m)->params());
}

std::unique_ptr<Model> ModelFrom(const ModelConfig& c, const HostTensorMap& t, Backend* be) {
  auto m = Model::Create(c, be);
  EXPECT_TRUE(m.ok()) << m.status();
  absl::Status s = HostToParams(t, (*m)->params());
  EXPECT_TRUE(s.ok()) << s;
  return std::move(*m);
}

// The first `layers` layers with the final norm and head, no exits.
std::pair<ModelConfig, HostTensorMap> Truncated(const ModelConfig& c, const HostTensorMap& t,
                                                int layers) {
  ModelConfig tc = c;
  tc.num_layers = layers;
  tc.exits.clear();
  HostTensorMap tt;
  for (const auto& [name, shape] : EellmParamShapes(tc)) tt[name] = t.at(name);
  return {tc, tt};
}

std::vector<float> Logits(Model& m, const std::vector<int32_t>& ids, int exit_index) {
  auto l = HeadLogits(m, ids, exit_index);
  EXPECT_TRUE(l.ok()) << l.status();
  return l.ok() ? *l : std::vector<float>{};
}

class ExitSurgeryTest : public ::testing::TestWithParam<ModelStyle> {};

// copy-final at post-layer L: the exit is the final norm and head applied to layer L's output,
// i.e. the final head of the model cut after layer L (a post exit at the last layer would
// duplicate the final head and is rejected by ModelConfig, see AddExitsErrors).
TEST_P(ExitSurgeryTest, CopyFinalEqualsFinalHeadOfTruncatedModel) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  HostTensorMap t = RandomTensors(c, be.get(), 1);
  const ModelConfig before = c;
  ASSERT_TRUE(
      AddExits(c, t, {Exit(3, ExitKind::kNorm, ExitPosition::kPost)}, ExitInit::kCopyFinal, 7)
          .ok());
  ASSERT_EQ(c.exits.size(), 1u);
  EXPECT_EQ(c.exits[0].layer, 3);
  EXPECT_EQ(t.at("exits.0.norm.weight").data, t.at("final_norm.weight").data);
  EXPECT_EQ(t.at("exits.0.head.weight").data,
            t.at(before.tie_embeddings ? "embedding.word.weight" : "output.weight").data);
  auto m = ModelFrom(c, t, be.get());
  auto [tc, tt] = Truncated(c, t, 3);
  auto cut = ModelFrom(tc, tt, be.get());
  const auto ids = testing::RandomTokens(10, c.vocab_size, 3);
  EXPECT_EQ(Logits(*m, ids, 0), Logits(*cut, ids, -1));
  // The backbone is untouched.
  auto orig = ModelFrom(before, Truncated(before, t, 4).second, be.get());
  EXPECT_EQ(Logits(*m, ids, -1), Logits(*orig, ids, -1));
}

// copy-block at post-layer L - 1 copies the last layer: the exit computes the final head.
TEST_P(ExitSurgeryTest, CopyBlockBeforeLastLayerEqualsFinalHead) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  HostTensorMap t = RandomTensors(c, be.get(), 2);
  ASSERT_TRUE(
      AddExits(c, t, {Exit(3, ExitKind::kBlock, ExitPosition::kPost)}, ExitInit::kCopyBlock, 7)
          .ok());
  for (const auto& [name, tensor] : t) {
    if (absl::StartsWith(name, "layers.3.")) {
      EXPECT_EQ(t.at("exits.0.block." + name.substr(9)).data, tensor.data) << name;
    }
  }
  EXPECT_EQ(t.at("exits.0.norm.weight").data, t.at("final_norm.weight").data);
  auto m = ModelFrom(c, t, be.get());
  const auto ids = testing::RandomTokens(10, c.vocab_size, 4);
  EXPECT_EQ(Logits(*m, ids, 0), Logits(*m, ids, -1));
}

// copy-mlp at post-layer L: the exit's MLP branch on layer L's attention output is layer L's
// own MLP, so the exit equals the final head of the model cut after layer L.
TEST_P(ExitSurgeryTest, CopyMlpCopiesTheLayersMlp) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  HostTensorMap t = RandomTensors(c, be.get(), 3);
  ASSERT_TRUE(
      AddExits(c, t, {Exit(2, ExitKind::kMlp, ExitPosition::kPost)}, ExitInit::kCopyMlp, 7).ok());
  int copied = 0;
  for (const auto& [name, tensor] : t) {
    if (absl::StartsWith(name, "layers.1.mlp")) {
      EXPECT_EQ(t.at("exits.0." + name.substr(9)).data, tensor.data) << name;
      ++copied;
    }
  }
  EXPECT_EQ(copied, GetParam() == ModelStyle::kLlama ? 4 : 6);
  auto m = ModelFrom(c, t, be.get());
  auto [tc, tt] = Truncated(c, t, 2);
  auto cut = ModelFrom(tc, tt, be.get());
  const auto ids = testing::RandomTokens(10, c.vocab_size, 5);
  EXPECT_EQ(Logits(*m, ids, 0), Logits(*cut, ids, -1));
}

TEST_P(ExitSurgeryTest, RandomInit) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  c.vocab_size = 128;
  c.hidden_size = 32;
  c.ffn_hidden_size = 64;
  HostTensorMap t = RandomTensors(c, be.get(), 4);
  const ModelConfig base = c;
  const HostTensorMap base_t = t;
  ModelConfig c2 = c;
  HostTensorMap t2 = t;
  const std::vector<ExitConfig> add = {Exit(1, ExitKind::kMlp, ExitPosition::kPost),
                                       Exit(3, ExitKind::kNorm, ExitPosition::kPost)};
  ASSERT_TRUE(AddExits(c, t, add, ExitInit::kRandom, 11).ok());
  ASSERT_TRUE(AddExits(c2, t2, add, ExitInit::kRandom, 12).ok());
  for (const char* name :
       {"exits.0.head.weight", "exits.1.head.weight", "exits.0.mlp.fc1.weight"}) {
    const auto& v = t.at(name).data;
    double mean = 0, sq = 0;
    for (float x : v) mean += x / v.size();
    for (float x : v) sq += (x - mean) * (x - mean) / v.size();
    EXPECT_NEAR(std::sqrt(sq), 0.02, 0.002) << name;
    EXPECT_NEAR(mean, 0.0, 0.002) << name;
    EXPECT_NE(v, t2.at(name).data) << "seed must matter: " << name;
  }
  for (const auto& [name, tensor] : t) {
    if (!absl::StartsWith(name, "exits.")) continue;
    for (float x : tensor.data) {
      if (absl::EndsWith(name, "norm.weight")) {
        ASSERT_EQ(x, 1.0f) << name;
      } else if (absl::EndsWith(name, ".bias")) {
        ASSERT_EQ(x, 0.0f) << name;
      }
    }
  }
  // Deterministic in the seed.
  ModelConfig c3 = base;
  HostTensorMap t3 = base_t;
  ASSERT_TRUE(AddExits(c3, t3, add, ExitInit::kRandom, 11).ok());
  EXPECT_EQ(t3.at("exits.1.head.weight").data, t.at("exits.1.head.weight").data);
}

// Exits are kept in depth order: existing exits are renumbered and their tensors follow them.
TEST_P(ExitSurgeryTest, AddingRenumbersExistingExits) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  c.exits = {Exit(1, ExitKind::kLinear, ExitPosition::kPre),
             Exit(3, ExitKind::kBlock, ExitPosition::kPost)};
  HostTensorMap t = RandomTensors(c, be.get(), 5);
  const auto ids = testing::RandomTokens(8, c.vocab_size, 6);
  auto before = ModelFrom(c, t, be.get());
  const auto exit0 = Logits(*before, ids, 0), exit1 = Logits(*before, ids, 1);
  const HostTensorMap old = t;
  ASSERT_TRUE(AddExits(c, t,
                       {Exit(3, ExitKind::kNorm, ExitPosition::kPre),
                        Exit(1, ExitKind::kMlp, ExitPosition::kPost, /*tied=*/true)},
                       ExitInit::kCopyFinal, 3)
                  .ok());
  ASSERT_EQ(c.exits.size(), 4u);
  EXPECT_EQ(c.exits[0].kind, ExitKind::kLinear);
  EXPECT_EQ(c.exits[1].kind, ExitKind::kMlp);
  EXPECT_EQ(c.exits[2].kind, ExitKind::kNorm);
  EXPECT_EQ(c.exits[3].kind, ExitKind::kBlock);
  EXPECT_EQ(t.at("exits.3.block.attn.wq.weight").data, old.at("exits.1.block.attn.wq.weight").data);
  EXPECT_EQ(t.at("exits.3.head.weight").data, old.at("exits.1.head.weight").data);
  EXPECT_EQ(t.count("exits.1.head.weight"), 0u);  // the new MLP exit is tied
  auto after = ModelFrom(c, t, be.get());
  EXPECT_EQ(Logits(*after, ids, 0), exit0);
  EXPECT_EQ(Logits(*after, ids, 3), exit1);
}

TEST_P(ExitSurgeryTest, AddExitsErrors) {
  auto be = Cpu();
  ModelConfig c0 = Base(GetParam());
  c0.exits = {Exit(2, ExitKind::kNorm, ExitPosition::kPost)};
  const HostTensorMap t0 = RandomTensors(c0, be.get(), 6);
  struct Case {
    std::vector<ExitConfig> add;
    ExitInit init;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {{Exit(4, ExitKind::kNorm, ExitPosition::kPost)},
       ExitInit::kCopyFinal,
       {"layer 4", "out of range"}},
      {{Exit(0, ExitKind::kNorm, ExitPosition::kPre)},
       ExitInit::kCopyFinal,
       {"layer 0", "out of range"}},
      {{Exit(5, ExitKind::kNorm, ExitPosition::kPre)},
       ExitInit::kRandom,
       {"layer 5", "out of range"}},
      {{Exit(2, ExitKind::kMlp, ExitPosition::kPost)},
       ExitInit::kRandom,
       {"existing exit 0", "post-layer 2"}},
      {{Exit(3, ExitKind::kNorm, ExitPosition::kPre)},
       ExitInit::kRandom,
       {"existing exit 0", "pre-layer 3"}},
      {{Exit(1, ExitKind::kNorm, ExitPosition::kPost),
        Exit(2, ExitKind::kLinear, ExitPosition::kPre)},
       ExitInit::kRandom,
       {"new exit 1", "new exit 0"}},
      {{Exit(1, ExitKind::kNorm, ExitPosition::kPost)}, ExitInit::kCopyMlp, {"copy-mlp", "norm"}},
      {{Exit(1, ExitKind::kLinear, ExitPosition::kPost)},
       ExitInit::kCopyMlp,
       {"copy-mlp", "linear"}},
      {{Exit(1, ExitKind::kMlp, ExitPosition::kPost)}, ExitInit::kCopyBlock, {"copy-block", "mlp"}},
  };
  for (const Case& k : cases) {
    ModelConfig c = c0;
    HostTensorMap t = t0;
    absl::Status s = AddExits(c, t, k.add, k.init, 1);
    ASSERT_FALSE(s.ok()) << k.expect[0];
    for (const std::string& part : k.expect) {
      EXPECT_NE(s.message().find(part), std::string::npos) << "'" << part << "' not in: " << s;
    }
    EXPECT_EQ(c.ToJson(), c0.ToJson());  // unchanged on error
    EXPECT_EQ(t.size(), t0.size());
  }
  ModelConfig c = c0;
  HostTensorMap t = t0;
  t.erase("final_norm.weight");
  absl::Status s =
      AddExits(c, t, {Exit(1, ExitKind::kNorm, ExitPosition::kPost)}, ExitInit::kCopyFinal, 1);
  EXPECT_NE(s.message().find("final_norm.weight"), std::string::npos) << s;
  t = t0;
  t["exits.5.head.weight"] = {{1}, {0.0f}};
  s = AddExits(c, t, {Exit(1, ExitKind::kNorm, ExitPosition::kPost)}, ExitInit::kCopyFinal, 1);
  EXPECT_NE(s.message().find("exits.5.head.weight"), std::string::npos) << s;
}

// Post-layer L and pre-layer L + 1 read the same hidden state: moving gives the same logits.
TEST_P(ExitSurgeryTest, SetExitPositionKeepsLogits) {
  auto be = Cpu();
  ModelConfig c = Base(GetParam());
  c.exits = {Exit(1, ExitKind::kNorm, ExitPosition::kPost),
             Exit(2, ExitKind::kBlock, ExitPosition::kPost),
             Exit(4, ExitKind::kLinear, ExitPosition::kPre)};
  const HostTensorMap t = RandomTensors(c, be.get(), 7);
  const auto ids = testing::RandomTokens(9, c.vocab_size, 8);
  auto before = ModelFrom(c, t, be.get());
  std::vector<std::vector<float>> logits;
  for (int i = 0; i < 3; ++i) logits.push_back(Logits(*before, ids, i));
  ModelConfig moved = c;
  ASSERT_TRUE(SetExitPosition(moved, 0, ExitPosition::kPre).ok());
  ASSERT_TRUE(SetExitPosition(moved, 1, ExitPosition::kPre).ok());
  ASSERT_TRUE(SetExitPosition(moved, 2, ExitPosition::kPost).ok());
  ASSERT_TRUE(SetExitPosition(moved, 2, ExitPosition::kPost).ok());  // no-op
  EXPECT_EQ(moved.exits[0].layer, 2);
  EXPECT_EQ(moved.exits[0].position, ExitPosition::kPre);
  EXPECT_EQ(moved.exits[1].layer, 3);
  EXPECT_EQ(moved.exits[1].position, ExitPosition::kPre);
  EXPECT_EQ(moved.exits[2].layer, 3);
  EXPECT_EQ(moved.exits[2].position, ExitPosition::kPost);
  auto after = ModelFrom(moved, t, be.get());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Logits(*after, ids, i), logits[i]) << "exit " << i;
  // And back.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(SetExitPosition(moved, i, c.exits[i].position).ok());
  }
  EXPECT_EQ(moved.ToJson(), c.ToJson());
}

TEST(ExitSurgeryErrorsTest, SetExitPositionErrors) {
  ModelConfig c = Base(ModelStyle::kLlama);
  c.exits = {Exit(1, ExitKind::kNorm, ExitPosition::kPre),
             Exit(2, ExitKind::kMlp, ExitPosition::kPost)};
  const ModelConfig c0 = c;
  absl::Status s = SetExitPosition(c, 0, ExitPosition::kPost);
  EXPECT_NE(s.message().find("embeddings"), std::string::npos) << s;
  s = SetExitPosition(c, 1, ExitPosition::kPre);
  EXPECT_NE(s.message().find("MLP"), std::string::npos) << s;
  s = SetExitPosition(c, 2, ExitPosition::kPre);
  EXPECT_NE(s.message().find("exit index 2"), std::string::npos) << s;
  s = SetExitPosition(c, -1, ExitPosition::kPre);
  EXPECT_NE(s.message().find("exit index -1"), std::string::npos) << s;
  EXPECT_EQ(c.ToJson(), c0.ToJson());
}

TEST(ExitSurgeryErrorsTest, ParseExitInit) {
  for (ExitInit i :
       {ExitInit::kRandom, ExitInit::kCopyFinal, ExitInit::kCopyMlp, ExitInit::kCopyBlock}) {
    auto p = ParseExitInit(ExitInitName(i));
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*p, i);
  }
  EXPECT_EQ(*ParseExitInit("copy_mlp"), ExitInit::kCopyMlp);
  auto bad = ParseExitInit("copy");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("\"copy\""), std::string::npos);
}

TEST(ExitSurgeryErrorsTest, HostToParamsChecksEveryTensor) {
  auto be = Cpu();
  ModelConfig c = Base(ModelStyle::kGpt);
  c.exits = {Exit(2, ExitKind::kNorm, ExitPosition::kPost)};
  const HostTensorMap t = RandomTensors(c, be.get(), 8);
  auto m = *Model::Create(c, be.get());
  const HostTensorMap initial = ParamsToHost(m->params());
  HostTensorMap missing = t;
  missing.erase("exits.0.norm.bias");
  absl::Status s = HostToParams(missing, m->params());
  EXPECT_NE(s.message().find("exits.0.norm.bias"), std::string::npos) << s;
  HostTensorMap shape = t;
  shape["layers.0.attn.wq.weight"].shape = {8, 32};
  s = HostToParams(shape, m->params());
  EXPECT_NE(s.message().find("layers.0.attn.wq.weight"), std::string::npos) << s;
  HostTensorMap extra = t;
  extra["output.weight"] = {{29, 16}, std::vector<float>(29 * 16)};
  s = HostToParams(extra, m->params());
  EXPECT_NE(s.message().find("output.weight"), std::string::npos) << s;
  // Nothing was written by the failed loads.
  const HostTensorMap unchanged = ParamsToHost(m->params());
  for (const auto& [name, tensor] : initial) EXPECT_EQ(unchanged.at(name).data, tensor.data);
  ASSERT_TRUE(HostToParams(t, m->params()).ok());
  const HostTensorMap back = ParamsToHost(m->params());
  for (const auto& [name, tensor] : t) EXPECT_EQ(back.at(name).data, tensor.data) << name;
  auto ids = testing::RandomTokens(4, c.vocab_size, 1);
  EXPECT_FALSE(HeadLogits(*m, ids, 1).ok());
  ids[2] = c.vocab_size;
  EXPECT_FALSE(HeadLogits(*m, ids, -1).ok());
}

INSTANTIATE_TEST_SUITE_P(Styles, ExitSurgeryTest,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama),
                         [](const ::testing::TestParamInfo<ModelStyle>& i) {
                           return i.param == ModelStyle::kGpt ? std::string("Gpt")
                                                              : std::string("Llama");
                         });

}  // namespace
}  // namespace eellm
