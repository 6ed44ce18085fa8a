// TensorBoard event files (launch/tensorboard_events.h): CRC-32C check values, an event's bytes
// as the protocol buffer schema lays them out (field numbers of tensorflow.Event, Summary and
// Summary.Value), scalars read back, and damaged files refused naming the record.
#include "launch/tensorboard_events.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>

#include "gtest/gtest.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;

TEST(TensorBoardEventsTest, Crc32cCheckValues) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xe3069283u);
  std::vector<uint8_t> b(32, 0);
  EXPECT_EQ(Crc32c(b.data(), b.size()), 0x8a9136aau);
  std::fill(b.begin(), b.end(), 0xff);
  EXPECT_EQ(Crc32c(b.data(), b.size()), 0x62a8ab43u);
  std::iota(b.begin(), b.end(), 0);
  EXPECT_EQ(Crc32c(b.data(), b.size()), 0x46dd794eu);
}

class TensorBoardFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("eellm_tb_" + std::to_string(getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  static std::string Bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  fs::path dir_;
};

TEST_F(TensorBoardFileTest, EventsHoldTheScalarsInTheSchemasLayout) {
  auto events = TensorBoardEvents::Open((dir_ / "tb").string());
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_NE(events->path().find("/tb/events.out.tfevents."), std::string::npos) << events->path();
  events->Write(5, {{"a", 1.0f}});
  events->Write(7, {{"loss/final", 2.5f}, {"loss/exit@2", -0.125f}});
  const std::string bytes = Bytes(events->path());
  // Record 1: the file version: wall_time (field 1, fixed64) and "brain.Event:2" (field 3).
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ(n, 9u + 2 + 13);
  EXPECT_EQ(bytes[12], '\x09');
  EXPECT_EQ(bytes.substr(12 + 9, 15), std::string("\x1a\x0d") + "brain.Event:2");
  // Record 2: wall_time, step 5 (field 2, varint), summary (field 5) of one value (field 1) of
  // tag "a" (field 1) and simple_value 1.0f (field 2, fixed32).
  const size_t second = 12 + n + 4;
  std::memcpy(&n, bytes.data() + second, 8);
  const std::string want(
      "\x10\x05\x2a\x0a\x0a\x08\x0a\x01"
      "a\x15\x00\x00\x80\x3f",
      14);
  ASSERT_EQ(n, 9 + want.size());
  EXPECT_EQ(bytes[second + 12], '\x09');
  EXPECT_EQ(bytes.substr(second + 12 + 9, want.size()), want);

  auto scalars = ReadTensorBoardScalars(events->path());
  ASSERT_TRUE(scalars.ok()) << scalars.status();
  ASSERT_EQ(scalars->size(), 3u);
  EXPECT_EQ((*scalars)[0].tag, "a");
  EXPECT_EQ((*scalars)[0].step, 5);
  EXPECT_EQ((*scalars)[0].value, 1.0f);
  EXPECT_EQ((*scalars)[1].tag, "loss/final");
  EXPECT_EQ((*scalars)[2].tag, "loss/exit@2");
  EXPECT_EQ((*scalars)[2].step, 7);
  EXPECT_EQ((*scalars)[2].value, -0.125f);
}

// A resumed run's file starts the session after its checkpoint's step (TensorBoard then drops
// the points a crashed run logged from there on); files opened in one second stay apart.
TEST_F(TensorBoardFileTest, AResumedRunStartsASessionAfterItsStep) {
  auto first = TensorBoardEvents::Open(dir_.string());
  auto resumed = TensorBoardEvents::Open(dir_.string(), 40);
  ASSERT_TRUE(first.ok() && resumed.ok());
  EXPECT_NE(first->path(), resumed->path());
  first->Write(3, {{"lr", 1.0f}});
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 2);
  const std::string plain = Bytes(first->path()), bytes = Bytes(resumed->path());
  // The second record of the resumed file: wall_time, step 41, session_log (field 6) START.
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const size_t second = 12 + n + 4;
  std::memcpy(&n, bytes.data() + second, 8);
  const std::string want("\x10\x29\x32\x02\x08\x01", 6);
  ASSERT_EQ(n, 9 + want.size());
  EXPECT_EQ(bytes.substr(second + 12 + 9, want.size()), want);
  EXPECT_EQ(bytes.size(), second + 12 + n + 4);
  // The fresh run's file has no session event: its version record, then the scalars.
  std::memcpy(&n, plain.data(), 8);
  EXPECT_EQ(plain.find(std::string("\x32\x02\x08\x01", 4)), std::string::npos);
  auto scalars = ReadTensorBoardScalars(resumed->path());
  ASSERT_TRUE(scalars.ok()) << scalars.status();
  EXPECT_TRUE(scalars->empty());
}

TEST_F(TensorBoardFileTest, DamagedFilesAreRefusedNamingTheRecord) {
  auto events = TensorBoardEvents::Open(dir_.string());
  ASSERT_TRUE(events.ok()) << events.status();
  events->Write(1, {{"lr", 0.5f}});
  const std::string path = events->path(), bytes = Bytes(path);
  // The last record: an event of 24 bytes (wall_time 9, step 2, summary 13).
  const size_t second = bytes.size() - (12 + 24 + 4);
  auto write = [&](const std::string& b) { std::ofstream(path, std::ios::binary) << b; };
  struct Case {
    size_t at;
    const char* want;
  };
  for (const Case c : {Case{second + 20, "data CRC mismatch"}, Case{second + 1, "length CRC"},
                       Case{bytes.size() - 1, "data CRC mismatch"}}) {
    std::string damaged = bytes;
    damaged[c.at] ^= 0x40;
    write(damaged);
    auto r = ReadTensorBoardScalars(path);
    ASSERT_FALSE(r.ok()) << c.at;
    EXPECT_NE(r.status().message().find(c.want), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find("record at byte " + std::to_string(second)),
              std::string::npos)
        << r.status();
  }
  write(bytes.substr(0, bytes.size() - 3));
  auto truncated = ReadTensorBoardScalars(path);
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("truncated"), std::string::npos)
      << truncated.status();
  write(bytes);
  auto whole = ReadTensorBoardScalars(path);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ASSERT_EQ(whole->size(), 1u);
  EXPECT_EQ((*whole)[0].value, 0.5f);
}

}  // namespace
}  // namespace eellm
