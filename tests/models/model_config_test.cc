// ModelConfig JSON: RoPE scaling parses, round-trips through the canonical JSON, and every bad
// value is named.
#include "models/model_config.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace eellm {
namespace {

std::string Llama(const std::string& extra) {
  return R"({"style": "llama", "vocab_size": 32, "hidden_size": 32, "num_layers": 2,
             "num_heads": 4, "max_seq_len": 64)" +
         extra + "}";
}

TEST(ModelConfigTest, RopeScalingParsesAndRoundTrips) {
  auto c = ParseModelConfig(Llama(R"(, "rope_theta": 500000, "rope_scaling": {"type": "llama3",
      "factor": 32, "low_freq_factor": 2, "high_freq_factor": 8,
      "original_max_position_embeddings": 4096})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 32.0f);
  EXPECT_EQ(c->rope_scaling.low_freq_factor, 2.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.original_max_positions, 4096);
  EXPECT_EQ(c->rope().theta, 500000.0f);
  EXPECT_EQ(c->rope().scaling.factor, 32.0f);
  auto back = ParseModelConfig(c->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), c->ToJson());
  EXPECT_EQ(back->rope_scaling.kind, RopeScalingKind::kLlama3);
  EXPECT_EQ(back->rope_scaling.factor, 32.0f);
  EXPECT_EQ(back->rope_scaling.low_freq_factor, 2.0f);
  EXPECT_EQ(back->rope_scaling.high_freq_factor, 8.0f);
  EXPECT_EQ(back->rope_scaling.original_max_positions, 4096);

  // llama3's defaults are Llama 3.1's; linear needs only the factor.
  c = ParseModelConfig(Llama(R"(, "rope_scaling": {"type": "llama3", "factor": 8})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_positions, 8192);
  c = ParseModelConfig(Llama(R"(, "rope_scaling": {"type": "linear", "factor": 2})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 2.0f);
  EXPECT_NE(c->ToJson().find("\"linear\""), std::string::npos);

  // Absent or null: plain RoPE, and the canonical JSON does not name it.
  for (const std::string& extra : {std::string(), std::string(R"(, "rope_scaling": null)")}) {
    c = ParseModelConfig(Llama(extra));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->rope_scaling.kind, RopeScalingKind::kNone);
    EXPECT_EQ(c->ToJson().find("rope_scaling"), std::string::npos);
  }
}

std::string Llama5Heads(const std::string& extra) {
  return R"({"style": "llama", "vocab_size": 32, "hidden_size": 32, "num_layers": 2,
             "num_heads": 5, "num_kv_heads": 1, "max_seq_len": 64)" +
         extra + "}";
}

TEST(ModelConfigTest, HeadDimMayDifferFromHiddenOverHeads) {
  auto c = ParseModelConfig(Llama(R"(, "head_dim": 16)"));  // 4 heads of 16 over hidden 32
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim(), 16);
  EXPECT_EQ(LocalConfig(*c, 2).head_dim(), 16);  // tensor parallelism splits heads, not their size
  EXPECT_NE(c->ToJson().find("\"head_dim\": 16"), std::string::npos);
  EXPECT_EQ(ParseModelConfig(c->ToJson())->head_dim(), 16);
  // Equal to hidden / heads: the same model, and the canonical JSON stays as before.
  c = ParseModelConfig(Llama(R"(, "head_dim": 8)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim(), 8);
  EXPECT_EQ(c->ToJson(), ParseModelConfig(Llama(""))->ToJson());
  // Without head_dim, num_heads must divide hidden_size; with it, not.
  EXPECT_FALSE(ParseModelConfig(Llama5Heads("")).ok());
  c = ParseModelConfig(Llama5Heads(R"(, "head_dim": 8)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim(), 8);
  for (const std::string& bad :
       {Llama(R"(, "head_dim": 0)"), Llama(R"(, "head_dim": -4)"),
        std::string(R"({"style": "gpt", "vocab_size": 32, "hidden_size": 32, "num_layers": 2,
                        "num_heads": 4, "max_seq_len": 64, "head_dim": 16})")}) {
    auto r = ParseModelConfig(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("head_dim"), std::string::npos) << r.status();
  }
}

TEST(ModelConfigTest, QkNormIsForLlama) {
  auto c = ParseModelConfig(Llama(R"(, "qk_norm": true)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_TRUE(ParseModelConfig(c->ToJson())->qk_norm);
  EXPECT_EQ(ParseModelConfig(Llama(""))->ToJson().find("qk_norm"), std::string::npos);
  auto g = ParseModelConfig(R"({"style": "gpt", "vocab_size": 32, "hidden_size": 32,
      "num_layers": 2, "num_heads": 4, "max_seq_len": 64, "qk_norm": true})");
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("qk_norm is for style llama"), std::string::npos);
}

TEST(ModelConfigTest, BadRopeScalingIsNamed) {
  struct Case {
    std::string json;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {Llama(R"(, "rope_scaling": {"type": "yarn", "factor": 4})"),
       {"\"yarn\"", "linear or llama3"}},
      {Llama(R"(, "rope_scaling": {"factor": 4})"), {"rope_scaling", "type"}},
      {Llama(R"(, "rope_scaling": {"type": "linear"})"), {"rope_scaling", "factor"}},
      {Llama(R"(, "rope_scaling": {"type": "linear", "factor": 0})"),
       {"factor must be > 0, got 0"}},
      {Llama(R"(, "rope_scaling": {"type": "linear", "factor": 2, "low_freq_factor": 1})"),
       {"low_freq_factor"}},
      {Llama(R"(, "rope_scaling": {"type": "llama3", "factor": 8, "low_freq_factor": 4,
                                   "high_freq_factor": 4})"),
       {"low_freq_factor < high_freq_factor", "4 and 4"}},
      {Llama(R"(, "rope_scaling": {"type": "llama3", "factor": 8,
                                   "original_max_position_embeddings": -1})"),
       {"original_max_position_embeddings", "-1"}},
      {Llama(R"(, "rope_scaling": "llama3")"), {"rope_scaling must be an object", "\"llama3\""}},
      {R"({"style": "gpt", "vocab_size": 32, "hidden_size": 32, "num_layers": 2,
           "num_heads": 4, "max_seq_len": 64, "rope_scaling": {"type": "linear", "factor": 2}})",
       {"rope_scaling", "style llama"}},
  };
  for (const Case& k : cases) {
    auto c = ParseModelConfig(k.json);
    ASSERT_FALSE(c.ok()) << k.json;
    for (const std::string& s : k.expect) {
      EXPECT_NE(c.status().message().find(s), std::string::npos)
          << "'" << s << "' not in: " << c.status().message();
    }
  }
}

}  // namespace
}  // namespace eellm
