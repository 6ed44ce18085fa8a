// Megatron-LM datasets read in place (models/megatron_data.h): tokens and document starts for
// both token widths, the train/validation split at a document start, and every malformed index
// refused naming the file and the fault.
#include "models/megatron_data.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/models/megatron_fixture.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;

class MegatronDataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("eellm_megatron_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name(), "_",
                        ::getpid());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

const std::vector<std::vector<int32_t>> kDocs = {{1, 2, 3}, {40000, 5}, {}, {6, 7, 8, 9}, {10}};

TEST_F(MegatronDataTest, ReadsTokensAndDocumentsOfEitherWidth) {
  for (int width : {2, 4}) {
    SCOPED_TRACE(width);
    const std::string prefix = Path(absl::StrCat("corpus", width));
    testing::WriteMegatronDataset(prefix, kDocs, width);
    EXPECT_TRUE(IsMegatronPrefix(prefix));
    auto data = LoadMegatronData(prefix);
    ASSERT_TRUE(data.ok()) << data.status();
    const std::vector<int32_t> want = {1, 2, 3, 40000, 5, 6, 7, 8, 9, 10};
    ASSERT_EQ(data->tokens.size(), 10);
    for (int i = 0; i < 10; ++i) EXPECT_EQ(data->tokens.at(i), want[i]) << i;
    EXPECT_EQ(data->tokens.MaxToken(), 40000);
    // The empty document starts nowhere.
    EXPECT_EQ(data->document_starts, (std::vector<int64_t>{0, 3, 5, 9}));
  }
  EXPECT_FALSE(IsMegatronPrefix(Path("missing")));
}

// Megatron's builder writes a document that tokenized to nothing as a repeated document index
// entry (no sequence); documents without tokens at the start and the end start nowhere either.
TEST_F(MegatronDataTest, DocumentsWithoutTokensAsMegatronWritesThem) {
  const std::string prefix = Path("gaps");
  testing::WriteMegatronDataset(prefix, {{}, {1, 2}, {3, 4, 5}, {}});
  std::ofstream(prefix + ".idx", std::ios::binary | std::ios::trunc)
      << testing::MegatronIndex({0, 2, 3, 0}, 2, {0, 1, 2, 2, 3, 4});
  auto data = LoadMegatronData(prefix);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->tokens.size(), 5);
  EXPECT_EQ(data->document_starts, (std::vector<int64_t>{0, 2}));
  auto split = SplitMegatronData(*data, 0.4);
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_EQ(split->first.size(), 2);
  EXPECT_EQ(split->second.size(), 3);
}

TEST_F(MegatronDataTest, ValidationStartsAtADocument) {
  testing::WriteMegatronDataset(Path("c"), kDocs);
  const MegatronData data = *LoadMegatronData(Path("c"));
  auto split = [&](double f) {
    auto s = SplitMegatronData(data, f);
    EXPECT_TRUE(s.ok()) << s.status();
    return s->first.size();
  };
  EXPECT_EQ(split(0.1), 9);  // token 9 is the last document, [10]
  EXPECT_EQ(split(0.2), 5);  // token 8 lies in [6, 7, 8, 9]: its start
  EXPECT_EQ(split(0.5), 5);  // token 5 as well
  auto s = *SplitMegatronData(data, 0.2);
  EXPECT_EQ(s.second.size(), 5);
  EXPECT_EQ(s.second.at(0), 6);
  EXPECT_EQ(s.first.at(4), 5);
  // A document of almost everything: validation still leaves the first document for training.
  testing::WriteMegatronDataset(Path("two"), {{1, 2, 3, 4, 5, 6, 7, 8}, {9}});
  EXPECT_EQ(SplitMegatronData(*LoadMegatronData(Path("two")), 0.5)->first.size(), 8);
  testing::WriteMegatronDataset(Path("one"), {{1, 2, 3}});
  EXPECT_FALSE(SplitMegatronData(*LoadMegatronData(Path("one")), 0.1).ok());
  EXPECT_FALSE(SplitMegatronData(data, 0.7).ok());
}

TEST_F(MegatronDataTest, MalformedIndexesAreNamed) {
  const std::string prefix = Path("bad");
  testing::WriteMegatronDataset(prefix, kDocs);
  const std::string good = testing::MegatronIndex({3, 2, 0, 4, 1}, 2);
  auto expect_error = [&](const std::string& idx, const std::string& want) {
    std::ofstream(prefix + ".idx", std::ios::binary | std::ios::trunc) << idx;
    auto r = LoadMegatronData(prefix);
    ASSERT_FALSE(r.ok()) << want;
    EXPECT_NE(r.status().message().find(want), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(prefix + ".idx"), std::string::npos) << r.status();
  };
  std::string idx = good;
  idx[0] = 'X';
  expect_error(idx, "MMIDIDX");
  idx = good;
  idx[9] = 2;
  expect_error(idx, "version 2");
  idx = good;
  idx[17] = 6;  // float64
  expect_error(idx, "dtype code 6");
  expect_error(good.substr(0, good.size() - 1), "need");
  idx = good;
  idx[34 + 4 * 5 + 8] = 7;  // the second sequence's pointer
  expect_error(idx, "sequence 1");
  idx = testing::MegatronIndex({3, 2, 0, 4, 2}, 2);  // one token more than .bin holds
  expect_error(idx, "bytes");
  idx = good;
  idx[idx.size() - 8] = 3;  // the document index's last entry goes back
  expect_error(idx, "document_index[5]");
  // Negative ids in an int32 dataset read as unsigned: over any vocabulary.
  testing::WriteMegatronDataset(Path("neg"), {{1, -2, 3}}, 4);
  EXPECT_GT(LoadMegatronData(Path("neg"))->tokens.MaxToken(), int64_t{1} << 31);
  auto missing = LoadMegatronData(Path("nothing"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace eellm
