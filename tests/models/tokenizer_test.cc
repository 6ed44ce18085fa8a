// Tests for the Tokenizer interface: ByteTokenizer round trips, special ids, MakeTokenizer.
#include "models/tokenizer.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

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

}  // namespace
}  // namespace eellm
