// Tests for token files (models/token_file.h), PrepareTokenData and TokenDataset batching.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"
#include "models/token_dataset.h"
#include "models/token_file.h"
#include "models/tokenizer.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;

// Gives each test a fresh scratch directory under the gtest temp dir.
class TokenDataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("eellm_token_data_", info->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  static void WriteBytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
  }
  static std::string ReadBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // Expects `s` to be an error of `code` whose message names `path`.
  static void ExpectErrorNaming(const absl::Status& s, absl::StatusCode code,
                                const std::string& path) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), path)) << s;
  }

  fs::path dir_;
};

// A valid 2-byte file with tokens {1, 2, 3}: the base for the corruption tests.
std::string ValidTwoByteFile() {
  return std::string("EELLMTOK") + std::string("\x01\x00\x00\x00", 4) +
         std::string("\x02\x00\x00\x00", 4) + std::string("\x01\x00\x02\x00\x03\x00", 6);
}

TEST_F(TokenDataTest, TwoByteRoundTrip) {
  const std::vector<int32_t> tokens = {0, 1, 255, 256, 257, 4242, 65535, 0, 7};
  const std::string path = Path("two.bin");
  ASSERT_TRUE(WriteTokenFile(path, tokens, 65536).ok());
  const std::string bytes = ReadBytes(path);
  ASSERT_EQ(bytes.size(), 16 + 2 * tokens.size());
  EXPECT_EQ(bytes.substr(0, 8), "EELLMTOK");
  EXPECT_EQ(bytes.substr(8, 8), std::string("\x01\x00\x00\x00\x02\x00\x00\x00", 8));
  EXPECT_EQ(bytes.substr(16 + 2 * 2, 2), std::string("\xFF\x00", 2));  // little-endian 255
  absl::StatusOr<std::vector<int32_t>> read = ReadTokenFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, tokens);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST_F(TokenDataTest, FourByteRoundTrip) {
  const std::vector<int32_t> tokens = {0, 65535, 65536, 99999, 123, 70000};
  const std::string path = Path("four.bin");
  ASSERT_TRUE(WriteTokenFile(path, tokens, 100000).ok());
  const std::string bytes = ReadBytes(path);
  ASSERT_EQ(bytes.size(), 16 + 4 * tokens.size());
  EXPECT_EQ(bytes.substr(12, 4), std::string("\x04\x00\x00\x00", 4));
  absl::StatusOr<std::vector<int32_t>> read = ReadTokenFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, tokens);

  const std::vector<int32_t> big = {2147483646, 5};
  ASSERT_TRUE(WriteTokenFile(Path("big.bin"), big, 2147483647).ok());
  EXPECT_EQ(*ReadTokenFile(Path("big.bin")), big);
}

TEST_F(TokenDataTest, EmptyFileAndParentDirectories) {
  const std::string path = Path("a/b/c/empty.bin");
  ASSERT_TRUE(WriteTokenFile(path, {}, 258).ok());
  EXPECT_EQ(fs::file_size(path), 16u);
  absl::StatusOr<std::vector<int32_t>> read = ReadTokenFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->empty());
}

TEST_F(TokenDataTest, OverwritesExistingFile) {
  const std::string path = Path("over.bin");
  ASSERT_TRUE(WriteTokenFile(path, {1, 2, 3, 4, 5}, 258).ok());
  ASSERT_TRUE(WriteTokenFile(path, {9}, 258).ok());
  EXPECT_EQ(*ReadTokenFile(path), std::vector<int32_t>({9}));
}

TEST_F(TokenDataTest, WriteRejectsOutOfRangeTokens) {
  const std::string path = Path("bad.bin");
  ExpectErrorNaming(WriteTokenFile(path, {1, 258}, 258), absl::StatusCode::kInvalidArgument, path);
  ExpectErrorNaming(WriteTokenFile(path, {-1}, 258), absl::StatusCode::kInvalidArgument, path);
  ExpectErrorNaming(WriteTokenFile(path, {0}, 0), absl::StatusCode::kInvalidArgument, path);
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(TokenDataTest, ReadMissingFile) {
  const std::string path = Path("does_not_exist.bin");
  ExpectErrorNaming(ReadTokenFile(path).status(), absl::StatusCode::kNotFound, path);
}

TEST_F(TokenDataTest, ReadBadMagic) {
  const std::string path = Path("magic.bin");
  std::string bytes = ValidTwoByteFile();
  bytes[0] = 'X';
  WriteBytes(path, bytes);
  const absl::Status s = ReadTokenFile(path).status();
  ExpectErrorNaming(s, absl::StatusCode::kDataLoss, path);
  EXPECT_TRUE(absl::StrContains(s.message(), "magic")) << s;
}

TEST_F(TokenDataTest, ReadBadVersion) {
  const std::string path = Path("version.bin");
  std::string bytes = ValidTwoByteFile();
  bytes[8] = 2;
  WriteBytes(path, bytes);
  const absl::Status s = ReadTokenFile(path).status();
  ExpectErrorNaming(s, absl::StatusCode::kUnimplemented, path);
  EXPECT_TRUE(absl::StrContains(s.message(), "version 2")) << s;
}

TEST_F(TokenDataTest, ReadBadTokenWidth) {
  const std::string path = Path("width.bin");
  std::string bytes = ValidTwoByteFile();
  bytes[12] = 3;
  WriteBytes(path, bytes);
  ExpectErrorNaming(ReadTokenFile(path).status(), absl::StatusCode::kDataLoss, path);
}

TEST_F(TokenDataTest, ReadTruncatedHeader) {
  const std::string path = Path("short.bin");
  WriteBytes(path, ValidTwoByteFile().substr(0, 10));
  ExpectErrorNaming(ReadTokenFile(path).status(), absl::StatusCode::kDataLoss, path);
  WriteBytes(path, "");
  ExpectErrorNaming(ReadTokenFile(path).status(), absl::StatusCode::kDataLoss, path);
}

TEST_F(TokenDataTest, ReadOddBodySize) {
  const std::string path = Path("odd.bin");
  WriteBytes(path, ValidTwoByteFile() + "\x04");  // 7 body bytes with 2-byte tokens
  const absl::Status s = ReadTokenFile(path).status();
  ExpectErrorNaming(s, absl::StatusCode::kDataLoss, path);
  EXPECT_TRUE(absl::StrContains(s.message(), "truncated")) << s;

  ASSERT_TRUE(WriteTokenFile(path, {1, 2, 3}, 100000).ok());
  std::string four = ReadBytes(path);
  WriteBytes(path, four.substr(0, four.size() - 2));  // last 4-byte token cut in half
  ExpectErrorNaming(ReadTokenFile(path).status(), absl::StatusCode::kDataLoss, path);
}

// Lines of varying length with multi-byte characters, ~`lines` lines.
std::string GeneratedText(int lines) {
  std::string text;
  for (int i = 0; i < lines; ++i) {
    absl::StrAppend(&text, "line ", i, ": ");
    for (int j = 0; j < (i * 7) % 23; ++j) text += (j % 5 == 0) ? "\xC3\xA9" : "ab";
    text += "\n";
  }
  return text;
}

TEST_F(TokenDataTest, PrepareTokenDataSplitsAtLineBoundary) {
  const std::string text = GeneratedText(500);
  const std::string text_path = Path("corpus.txt");
  WriteBytes(text_path, text);
  ByteTokenizer tok;
  const std::string prefix = Path("out/corpus");
  absl::StatusOr<DataPrepResult> result = PrepareTokenData(text_path, tok, prefix, 0.1);
  ASSERT_TRUE(result.ok()) << result.status();

  absl::StatusOr<std::vector<int32_t>> train = ReadTokenFile(prefix + ".train.bin");
  absl::StatusOr<std::vector<int32_t>> val = ReadTokenFile(prefix + ".val.bin");
  ASSERT_TRUE(train.ok()) << train.status();
  ASSERT_TRUE(val.ok()) << val.status();
  EXPECT_EQ(static_cast<int64_t>(train->size()), result->train_tokens);
  EXPECT_EQ(static_cast<int64_t>(val->size()), result->val_tokens);

  std::vector<int32_t> joined = *train;
  joined.insert(joined.end(), val->begin(), val->end());
  EXPECT_EQ(joined, tok.Encode(text));

  const double frac = static_cast<double>(val->size()) / static_cast<double>(joined.size());
  EXPECT_NEAR(frac, 0.1, 0.01);
  EXPECT_EQ(train->back(), '\n');  // validation starts at the beginning of a line
}

// JSON lines: each document's text, then the end-of-text id; the split falls after one; bad
// lines are named.
TEST_F(TokenDataTest, PrepareTokenDataReadsJsonLinesAsDocuments) {
  std::string jsonl, flat;
  std::vector<int32_t> want;
  ByteTokenizer tok;
  for (int i = 0; i < 60; ++i) {
    const std::string doc =
        absl::StrCat("document ", i, " has no newline, \"quotes\" and \xC3\xA9");
    absl::StrAppend(&jsonl, "{\"id\": ", i, ", \"text\": \"",
                    absl::StrReplaceAll(doc, {{"\"", "\\\""}}), "\"}\n", i == 30 ? "\n" : "");
    for (int32_t t : tok.Encode(doc)) want.push_back(t);
    want.push_back(ByteTokenizer::kEosId);
  }
  const std::string path = Path("docs.jsonl");
  WriteBytes(path, jsonl);
  const std::string prefix = Path("out/docs");
  absl::StatusOr<DataPrepResult> result = PrepareTokenData(path, tok, prefix, 0.1);
  ASSERT_TRUE(result.ok()) << result.status();
  absl::StatusOr<std::vector<int32_t>> train = ReadTokenFile(prefix + ".train.bin");
  absl::StatusOr<std::vector<int32_t>> val = ReadTokenFile(prefix + ".val.bin");
  ASSERT_TRUE(train.ok() && val.ok());
  std::vector<int32_t> joined = *train;
  joined.insert(joined.end(), val->begin(), val->end());
  EXPECT_EQ(joined, want);
  EXPECT_EQ(train->back(), ByteTokenizer::kEosId);  // validation starts with a document

  WriteBytes(path, "{\"text\": \"a\"}\n[1, 2]\n");
  ExpectErrorNaming(PrepareTokenData(path, tok, prefix, 0.1).status(),
                    absl::StatusCode::kInvalidArgument, path + " line 2 is not a JSON object");
  WriteBytes(path, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n");
  ExpectErrorNaming(PrepareTokenData(path, tok, prefix, 0.1).status(),
                    absl::StatusCode::kInvalidArgument, "line 2 has no string \"text\"");
  // Other keys, each a document.
  WriteBytes(path,
             "{\"title\": \"t1\", \"body\": \"b1\"}\n{\"title\": \"t2\", \"body\": \"b2\"}\n");
  ASSERT_TRUE(PrepareTokenData(path, tok, prefix, 0.25, {"title", "body"}).ok());
  train = ReadTokenFile(prefix + ".train.bin");
  val = ReadTokenFile(prefix + ".val.bin");
  ASSERT_TRUE(train.ok() && val.ok());
  joined = *train;
  joined.insert(joined.end(), val->begin(), val->end());
  EXPECT_EQ(joined,
            (std::vector<int32_t>{'t', '1', 256, 'b', '1', 256, 't', '2', 256, 'b', '2', 256}));
}

TEST_F(TokenDataTest, PrepareTokenDataWithoutNewlinesCutsExactly) {
  std::string text;
  for (int i = 0; i < 1000; ++i) text += static_cast<char>('a' + i % 26);
  const std::string text_path = Path("flat.txt");
  WriteBytes(text_path, text);
  ByteTokenizer tok;
  absl::StatusOr<DataPrepResult> result = PrepareTokenData(text_path, tok, Path("flat"), 0.25);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->train_tokens, 750);
  EXPECT_EQ(result->val_tokens, 250);
  std::vector<int32_t> joined = *ReadTokenFile(Path("flat.train.bin"));
  std::vector<int32_t> val = *ReadTokenFile(Path("flat.val.bin"));
  joined.insert(joined.end(), val.begin(), val.end());
  EXPECT_EQ(tok.Decode(joined), text);
}

TEST_F(TokenDataTest, PrepareTokenDataErrors) {
  ByteTokenizer tok;
  const std::string text_path = Path("corpus.txt");
  WriteBytes(text_path, GeneratedText(100));

  for (double bad : {0.0, -0.1, 0.75}) {
    const absl::Status s = PrepareTokenData(text_path, tok, Path("out"), bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat(bad))) << s;
  }
  EXPECT_TRUE(PrepareTokenData(text_path, tok, Path("ok"), 0.5).ok());

  const std::string empty_path = Path("empty.txt");
  WriteBytes(empty_path, "");
  ExpectErrorNaming(PrepareTokenData(empty_path, tok, Path("out"), 0.1).status(),
                    absl::StatusCode::kInvalidArgument, empty_path);

  const std::string tiny_path = Path("tiny.txt");
  WriteBytes(tiny_path, "abcde");
  const absl::Status tiny = PrepareTokenData(tiny_path, tok, Path("out"), 0.1).status();
  ExpectErrorNaming(tiny, absl::StatusCode::kInvalidArgument, tiny_path);
  EXPECT_TRUE(absl::StrContains(tiny.message(), "too few tokens")) << tiny;

  const std::string missing = Path("missing.txt");
  ExpectErrorNaming(PrepareTokenData(missing, tok, Path("out"), 0.1).status(),
                    absl::StatusCode::kNotFound, missing);
  EXPECT_FALSE(fs::exists(Path("out.train.bin")));
}

// tokens[i] = i, so a window's first input is its offset.
TokenDataset IotaDataset(int n) {
  std::vector<int32_t> tokens(n);
  for (int i = 0; i < n; ++i) tokens[i] = i;
  return TokenDataset(std::move(tokens));
}

TEST(TokenDatasetTest, ValidateNamesSizes) {
  TokenDataset data = IotaDataset(10);
  EXPECT_EQ(data.size(), 10);
  EXPECT_TRUE(data.Validate(9).ok());
  const absl::Status s = data.Validate(10);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), "10 tokens")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "sequence length 10")) << s;
  EXPECT_FALSE(data.Validate(0).ok());
  EXPECT_FALSE(TokenDataset().Validate(1).ok());
}

TEST(TokenDatasetTest, RandomBatchIsDeterministicShiftedAndInRange) {
  const int n = 1000, batch = 8, seq = 16;
  TokenDataset data = IotaDataset(n);
  std::vector<int32_t> in1(batch * seq), tg1(batch * seq), in2(batch * seq), tg2(batch * seq);
  data.RandomBatch(42, 7, batch, seq, in1.data(), tg1.data());
  data.RandomBatch(42, 7, batch, seq, in2.data(), tg2.data());
  EXPECT_EQ(in1, in2);
  EXPECT_EQ(tg1, tg2);

  for (int r = 0; r < batch; ++r) {
    const int32_t offset = in1[r * seq];
    EXPECT_GE(offset, 0);
    EXPECT_LE(offset + seq, n - 1);  // the last target is still in the data
    for (int j = 0; j < seq; ++j) {
      EXPECT_EQ(in1[r * seq + j], offset + j);
      EXPECT_EQ(tg1[r * seq + j], offset + j + 1);
    }
  }

  data.RandomBatch(42, 8, batch, seq, in2.data(), tg2.data());
  EXPECT_NE(in1, in2);
  data.RandomBatch(43, 7, batch, seq, in2.data(), tg2.data());
  EXPECT_NE(in1, in2);
}

TEST(TokenDatasetTest, RandomRowsMatchSlicesOfTheBatch) {
  const int batch = 12, seq = 5;
  TokenDataset data = IotaDataset(300);
  std::vector<int32_t> in(batch * seq), tg(batch * seq);
  data.RandomBatch(1, 3, batch, seq, in.data(), tg.data());
  for (int first = 0; first < batch; first += 4) {
    std::vector<int32_t> sin(4 * seq), stg(4 * seq);
    data.RandomRows(1, 3, first, 4, seq, sin.data(), stg.data());
    EXPECT_EQ(sin, std::vector<int32_t>(in.begin() + first * seq, in.begin() + (first + 4) * seq));
    EXPECT_EQ(stg, std::vector<int32_t>(tg.begin() + first * seq, tg.begin() + (first + 4) * seq));
  }
}

TEST(TokenDatasetTest, RandomOffsetsCoverTheWholeRange) {
  const int n = 20, seq = 5, batch = 4;
  TokenDataset data = IotaDataset(n);
  std::vector<int> seen(n, 0);
  std::vector<int32_t> in(batch * seq), tg(batch * seq);
  for (int step = 0; step < 200; ++step) {
    data.RandomBatch(9, step, batch, seq, in.data(), tg.data());
    for (int r = 0; r < batch; ++r) ++seen[in[r * seq]];
  }
  for (int offset = 0; offset < n - seq; ++offset) EXPECT_GT(seen[offset], 0) << offset;
  for (int offset = n - seq; offset < n; ++offset) EXPECT_EQ(seen[offset], 0) << offset;
}

TEST(TokenDatasetTest, SequentialBatchesCoverDataInOrder) {
  const int n = 103, seq = 10, batch = 3;
  TokenDataset data = IotaDataset(n);
  // (103 - 1) / 10 = 10 windows -> 3 full batches of 3.
  ASSERT_EQ(data.NumSequentialBatches(batch, seq), 3);
  std::vector<int32_t> all_in, all_tg;
  std::vector<int32_t> in(batch * seq), tg(batch * seq);
  for (int64_t i = 0; i < data.NumSequentialBatches(batch, seq); ++i) {
    data.SequentialBatch(i, batch, seq, in.data(), tg.data());
    all_in.insert(all_in.end(), in.begin(), in.end());
    all_tg.insert(all_tg.end(), tg.begin(), tg.end());
  }
  ASSERT_EQ(all_in.size(), 90u);
  for (size_t k = 0; k < all_in.size(); ++k) {
    EXPECT_EQ(all_in[k], static_cast<int32_t>(k));  // in order, no gaps, no overlap
    EXPECT_EQ(all_tg[k], static_cast<int32_t>(k + 1));
  }

  EXPECT_EQ(data.NumSequentialBatches(1, 10), 10);
  EXPECT_EQ(IotaDataset(11).NumSequentialBatches(1, 10), 1);
  EXPECT_EQ(IotaDataset(10).NumSequentialBatches(1, 10), 0);
  EXPECT_EQ(IotaDataset(50).NumSequentialBatches(8, 10), 0);
}

TEST_F(TokenDataTest, DatasetLoadsTokenFile) {
  const std::string path = Path("ds.bin");
  ASSERT_TRUE(WriteTokenFile(path, {5, 6, 7, 8}, 258).ok());
  absl::StatusOr<TokenDataset> data = TokenDataset::Load(path);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->size(), 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(data->at(i), 5 + i);
  EXPECT_EQ(data->MaxToken(), 8);
  ExpectErrorNaming(TokenDataset::Load(Path("nope.bin")).status(), absl::StatusCode::kNotFound,
                    Path("nope.bin"));
}

}  // namespace
}  // namespace eellm
