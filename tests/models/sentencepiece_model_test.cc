// SentencePiece tokenizer.model files (written here as protocol buffers) load as BPE tokenizers:
// merges ordered by the merged piece's score, "▁" for spaces, byte fallback, <s> and </s>;
// other kinds of models are refused by name, and mutated files never crash the reader (also run
// under ASan/UBSan in fuzz_sanitized_tests).
#include "models/sentencepiece_model.h"

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "models/bpe_tokenizer.h"
#include "models/tokenizer.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

const std::string kSpace = "\xE2\x96\x81";  // "▁"

// Protocol buffer encoding, as much as ModelProto needs.
std::string Varint(uint64_t v) {
  std::string s;
  while (v >= 0x80) {
    s.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  s.push_back(static_cast<char>(v));
  return s;
}
std::string Key(int field, int wire) { return Varint(static_cast<uint64_t>(field) << 3 | wire); }
std::string Len(int field, const std::string& bytes) {
  return Key(field, 2) + Varint(bytes.size()) + bytes;
}
std::string VarintField(int field, uint64_t v) { return Key(field, 0) + Varint(v); }
std::string Piece(const std::string& text, float score, int type) {
  uint32_t bits;
  std::memcpy(&bits, &score, 4);
  std::string f = Key(2, 5);
  for (int i = 0; i < 4; ++i) f.push_back(static_cast<char>(bits >> (8 * i)));
  return Len(1, Len(1, text) + f + (type == 1 ? "" : VarintField(3, type)));
}

struct ModelSpec {
  int model_type = 2;  // BPE
  std::string normalizer = "identity";
  bool remove_extra_whitespaces = false;
};

// <unk>, <s>, </s>, the 256 byte pieces, then ▁ t h e a n (low scores) and the merged pieces
// ▁t he ▁the an ▁an with scores -1 .. -5.
std::string LlamaLikeModel(const ModelSpec& spec = ModelSpec()) {
  std::string m = Piece("<unk>", 0, 2) + Piece("<s>", 0, 3) + Piece("</s>", 0, 3);
  for (int b = 0; b < 256; ++b) m += Piece(absl::StrFormat("<0x%02X>", b), 0, 6);
  const std::vector<std::pair<std::string, float>> normal = {
      {kSpace, -10},        {"t", -11}, {"h", -12},         {"e", -13},
      {"a", -14},           {"n", -15}, {kSpace + "t", -1}, {"he", -2},
      {kSpace + "the", -3}, {"an", -4}, {kSpace + "an", -5}};
  for (const auto& [text, score] : normal) m += Piece(text, score, 1);
  m += Len(2, VarintField(3, spec.model_type));  // trainer_spec.model_type
  m += Len(3, Len(1, spec.normalizer) + VarintField(3, 1) +
                  VarintField(4, spec.remove_extra_whitespaces ? 1 : 0));
  return m;
}
constexpr int kFirstNormal = 3 + 256;

TEST(SentencePieceModel, LoadsAsTheEquivalentBpeTokenizer) {
  auto json = SentencePieceToTokenizerJson(LlamaLikeModel(), "tokenizer.model");
  ASSERT_TRUE(json.ok()) << json.status();
  const nlohmann::json j = nlohmann::json::parse(*json);
  const std::vector<std::string> merges = {kSpace + " t", "h e", kSpace + "t he", "a n",
                                           kSpace + " an"};
  EXPECT_EQ(j["model"]["merges"], nlohmann::json(merges));
  EXPECT_EQ(j["model"]["byte_fallback"], true);
  EXPECT_EQ(j["model"]["unk_token"], "<unk>");
  auto tok = BpeTokenizer::FromJson(*json, "tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), kFirstNormal + 11);
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  // "the an" -> "▁the▁an": ▁the, ▁an.
  EXPECT_EQ((*tok)->Encode("the an"), (std::vector<int32_t>{kFirstNormal + 8, kFirstNormal + 10}));
  // "thé": ▁t, h, then é's two bytes.
  EXPECT_EQ((*tok)->Encode("th\xC3\xA9"),
            (std::vector<int32_t>{kFirstNormal + 6, kFirstNormal + 2, 3 + 0xC3, 3 + 0xA9}));
  for (const std::string text : {"the an", "th\xC3\xA9", "an the  ate"}) {
    EXPECT_EQ((*tok)->Decode((*tok)->Encode(text)), text);
  }
  EXPECT_EQ((*tok)->Decode({1, kFirstNormal + 8, 2}), "the");  // <s> and </s> decode to nothing
}

TEST(SentencePieceModel, MakeTokenizerReadsAModelFile) {
  // (per process: this test runs in two executables, maybe at once)
  const std::string path = (std::filesystem::temp_directory_path() /
                            absl::StrFormat("eellm_sp_test_%d_tokenizer.model", getpid()))
                               .string();
  {
    std::ofstream f(path, std::ios::binary);
    f << LlamaLikeModel();
  }
  auto tok = MakeTokenizer(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("the"), std::vector<int32_t>{kFirstNormal + 8});
  auto json = TokenizerJson(path);
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_NE(json->find("\"merges\""), std::string::npos);
  std::filesystem::remove(path);
  auto missing = MakeTokenizer(path);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
}

TEST(SentencePieceModel, OtherModelsAreRefusedByName) {
  auto expect_error = [](const ModelSpec& spec, const std::string& what) {
    auto json = SentencePieceToTokenizerJson(LlamaLikeModel(spec), "t5.model");
    ASSERT_FALSE(json.ok());
    EXPECT_NE(json.status().message().find(what), std::string::npos) << json.status();
    EXPECT_NE(json.status().message().find("t5.model"), std::string::npos) << json.status();
  };
  ModelSpec unigram;
  unigram.model_type = 1;
  expect_error(unigram, "model_type UNIGRAM");
  ModelSpec nfkc;
  nfkc.normalizer = "nmt_nfkc";
  expect_error(nfkc, "normalizer \"nmt_nfkc\"");
  ModelSpec collapse;
  collapse.remove_extra_whitespaces = true;
  expect_error(collapse, "remove_extra_whitespaces");
  auto garbage = SentencePieceToTokenizerJson("{\"model\": 1}", "x.model");
  EXPECT_FALSE(garbage.ok());
  auto twice = SentencePieceToTokenizerJson(LlamaLikeModel() + Piece("he", -3, 1), "x.model");
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("\"he\" appears twice"), std::string::npos)
      << twice.status();
}

// Random byte changes, truncations and insertions: errors or tokenizers, never a crash.
TEST(SentencePieceModel, MutatedFilesNeverCrash) {
  const std::string good = LlamaLikeModel();
  std::mt19937 rng(7);
  int loaded = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string m = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % m.size();
      switch (rng() % 3) {
        case 0:
          m[at] = static_cast<char>(rng());
          break;
        case 1:
          m.resize(at);
          break;
        default:
          m.insert(at, 1, static_cast<char>(rng()));
      }
      if (m.empty()) m = "x";
    }
    auto json = SentencePieceToTokenizerJson(m, "mutated.model");
    if (!json.ok()) continue;
    auto tok = BpeTokenizer::FromJson(*json, "mutated.model");
    if (!tok.ok()) continue;
    ++loaded;
    const std::string text = "the an th\xC3\xA9";
    (void)(*tok)->Decode((*tok)->Encode(text));
  }
  EXPECT_GT(loaded, 0);
}

}  // namespace
}  // namespace eellm
