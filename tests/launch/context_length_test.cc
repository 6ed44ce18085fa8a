// The generator's context (--max_model_len, or what a prompt and completion need) and the check
// that refuses a KV cache larger than the memory free.
#include "launch/context_length.h"

#include <string>

#include "gtest/gtest.h"

namespace eellm {
namespace {

TEST(ContextLengthTest, FlagThenNeedThenTheModels) {
  ModelConfig c;
  c.max_seq_len = 131072;
  EXPECT_EQ(*ContextLength(c, 0, 0), 131072);
  EXPECT_EQ(*ContextLength(c, 0, 213), 213);        // generate: prompt + max_new_tokens
  EXPECT_EQ(*ContextLength(c, 0, 200000), 131072);  // the request is refused later, by name
  EXPECT_EQ(*ContextLength(c, 8192, 213), 8192);
  EXPECT_EQ(*ContextLength(c, 131072, 0), 131072);
  for (int bad : {-1, 131073}) {
    auto r = ContextLength(c, bad, 0);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("--max_model_len " + std::to_string(bad)),
              std::string::npos)
        << r.status();
    EXPECT_NE(r.status().message().find("131072"), std::string::npos) << r.status();
  }
}

TEST(ContextLengthTest, GeneratorMustFitInNinetyPercentOfTheFreeMemory) {
  // Llama 3.1 8B in fp32: 32 layers x K and V x 8 KV heads x 128 + the 4,096-wide hidden state.
  const int64_t per_token = 32 * 2 * 8 * 128 * 4 + 4096 * 4;  // 278,528 bytes
  const int64_t tokens = int64_t{16} * 131072;
  EXPECT_TRUE(CheckGeneratorFits(16 * 8192 * per_token, 16 * 8192, int64_t{40} << 30, "x").ok());
  EXPECT_TRUE(CheckGeneratorFits(tokens * per_token, tokens, -1, "x").ok());  // unknown
  const absl::Status s = CheckGeneratorFits(tokens * per_token, tokens, int64_t{64} << 30,
                                            "--max_batch 16 x the context 131072");
  ASSERT_FALSE(s.ok());
  for (const std::string part :
       {"2097152 tokens", "--max_batch 16 x the context 131072", "584.1 GB", "68.7 GB free",
        "--max_model_len", "--kv_cache_tokens"}) {
    EXPECT_NE(s.message().find(part), std::string::npos) << part << " not in: " << s.message();
  }
  // The boundary: 90% of the free memory.
  EXPECT_TRUE(CheckGeneratorFits(900, 1, 1000, "x").ok());
  EXPECT_FALSE(CheckGeneratorFits(901, 1, 1000, "x").ok());
  // Processes on one machine share its memory; each GPU's is its own.
  EXPECT_EQ(AvailablePerProcess(1000, true, 4), 250);
  EXPECT_EQ(AvailablePerProcess(1000, false, 4), 1000);
  EXPECT_EQ(AvailablePerProcess(1000, true, 1), 1000);
  EXPECT_EQ(AvailablePerProcess(-1, true, 4), -1);
}

TEST(ContextLengthTest, ByteSizes) {
  EXPECT_EQ(ByteSize(1500), "1.5 kB");
  EXPECT_EQ(ByteSize(12300000), "12.3 MB");
  EXPECT_EQ(ByteSize(int64_t{584} * 1000000000), "584.0 GB");
}

}  // namespace
}  // namespace eellm
