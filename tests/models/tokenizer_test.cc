// Tests for the Tokenizer interface: ByteTokenizer round trips, special ids, MakeTokenizer
// (including GPT-2's vocab.json + merges.txt).
#include "models/tokenizer.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "models/bpe_tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/models/tokenizer_json_fixtures.h"

namespace eellm {
namespace {

TEST(ByteTokenizerTest, RoundTripsUtf8WithMultiByteCharacters) {
  ByteTokenizer tok;
  // 2-, 3- and 4-byte UTF-8 sequences, a NUL, a newline and a high byte.
  const std::string text = std::string("h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x98\x80\n") +
                           std::string(1, '\0') + "\xFF";
  const std::vector<int32_t> ids = tok.Encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    EXPECT_EQ(ids[i], static_cast<unsigned char>(text[i])) << "byte " << i;
    EXPECT_GE(ids[i], 0);
    EXPECT_LT(ids[i], 256);
  }
  EXPECT_EQ(tok.Decode(ids), text);

  std::string streamed;
  for (int32_t id : ids) streamed += tok.DecodeToken(id);
  EXPECT_EQ(streamed, text);
}

TEST(ByteTokenizerTest, EmptyText) {
  ByteTokenizer tok;
  EXPECT_TRUE(tok.Encode("").empty());
  EXPECT_EQ(tok.Decode({}), "");
}

TEST(ByteTokenizerTest, SpecialIds) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 258);
  EXPECT_EQ(tok.eos_id(), 256);
  EXPECT_EQ(tok.bos_id(), 257);
  EXPECT_EQ(tok.name(), "byte");
  EXPECT_NE(tok.eos_id(), tok.bos_id());

  // Decode skips special (and out-of-range) ids.
  const std::vector<int32_t> ids = {tok.bos_id(), 'a', 'b', tok.eos_id(), 'c', -1, 9999};
  EXPECT_EQ(tok.Decode(ids), "abc");
  EXPECT_EQ(tok.DecodeToken(tok.eos_id()), "<|endoftext|>");
  EXPECT_EQ(tok.DecodeToken(tok.bos_id()), "<|beginoftext|>");
  EXPECT_EQ(tok.DecodeToken(258), "");
  EXPECT_EQ(tok.DecodeToken(-5), "");

  // Encoding never produces special ids, even for text spelling their names.
  for (int32_t id : tok.Encode("<|endoftext|>")) EXPECT_LT(id, 256);
}

TEST(MakeTokenizerTest, ByteSpec) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->name(), "byte");
  EXPECT_EQ((*tok)->vocab_size(), 258);
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("round trip")), "round trip");
}

TEST(MakeTokenizerTest, UnknownSpecNamesTheValue) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = MakeTokenizer("wordpiece-xyz");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(tok.status().message(), "wordpiece-xyz")) << tok.status();

  absl::StatusOr<std::unique_ptr<Tokenizer>> empty = MakeTokenizer("");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
}

// GPT-2's vocab.json + merges.txt load as the tokenizer.json holding the same vocabulary and
// merges (byte-level, "<|endoftext|>" special), by the vocab's path (merges beside it) or as a
// "VOCAB,MERGES" pair.
TEST(MakeTokenizerTest, Gpt2VocabAndMergesFiles) {
  const std::string dir = ::testing::TempDir() + "/gpt2_files_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  nlohmann::json j = testing::ByteLevelJson();
  j["added_tokens"] = {{{"id", 262}, {"content", "<|endoftext|>"}, {"special", true}}};
  nlohmann::json vocab = j["model"]["vocab"];
  vocab["<|endoftext|>"] = 262;
  std::ofstream(dir + "/gpt2-vocab.json") << vocab.dump();
  {
    std::ofstream m(dir + "/gpt2-merges.txt");
    m << "#version: 0.2\n";
    for (const auto& merge : j["model"]["merges"]) {
      m << (merge.is_string() ? merge.get<std::string>()
                              : merge[0].get<std::string>() + " " + merge[1].get<std::string>())
        << "\n";
    }
  }
  auto want = BpeTokenizer::FromJson(j.dump(), "reference");
  ASSERT_TRUE(want.ok()) << want.status();
  for (const std::string spec :
       {dir + "/gpt2-vocab.json", dir + "/gpt2-vocab.json," + dir + "/gpt2-merges.txt"}) {
    auto tok = MakeTokenizer(spec);
    ASSERT_TRUE(tok.ok()) << tok.status();
    EXPECT_EQ((*tok)->vocab_size(), 263);
    EXPECT_EQ((*tok)->eos_id(), 262);
    for (const std::string text : {"the thin tin", " aaa the<|endoftext|>in", "\xe4\xb8\x96 t"}) {
      EXPECT_EQ((*tok)->Encode(text), (*want)->Encode(text)) << text;
      EXPECT_EQ((*tok)->Decode((*tok)->Encode(text)), (*want)->Decode((*want)->Encode(text)));
    }
    EXPECT_EQ((*tok)->Encode("<|endoftext|>"), std::vector<int32_t>{262});
    EXPECT_EQ((*tok)->Encode(" the"), std::vector<int32_t>{258});  // "Ġt" + "he" merged
  }
  // Errors name the file and line.
  std::filesystem::rename(dir + "/gpt2-merges.txt", dir + "/other.txt");
  auto missing = MakeTokenizer(dir + "/gpt2-vocab.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "gpt2-merges.txt")) << missing.status();
  std::ofstream(dir + "/bad.txt") << "#version: 0.2\nh e\nthree parts here\n";
  auto bad = MakeTokenizer(dir + "/gpt2-vocab.json," + dir + "/bad.txt");
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "bad.txt line 3")) << bad.status();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace eellm
