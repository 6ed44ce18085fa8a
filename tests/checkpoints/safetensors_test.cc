// Tests for the safetensors reader and writer: hand-computed fp16/bf16 roundings, bit-exact F32
// round trips, byte images built here by hand from the spec (read and written), sharded model
// directories, every malformed-header rejection, and a fuzz loop over random and mutated images
// (EELLM_FUZZ_ITERATIONS and EELLM_FUZZ_SEED in the environment override its defaults).
#include "checkpoints/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/core/dtype.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz_env.h"
#include "tests/scratch_dir.h"

namespace eellm {
namespace {

using testing::FuzzIterations;
using testing::FuzzSeed;

namespace fs = std::filesystem;

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A fresh, empty path under the test temp dir, of this process (the same tests also run in the
// sanitized binary, in parallel).
std::string TempPath(const std::string& name) {
  const std::string path = eellm::testing::ScratchPath(name);
  fs::remove_all(path);
  return path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A file image from a header text (padded with spaces to a multiple of 8 when `pad`) and buffer
// bytes, assembled by hand: 8 bytes little-endian header size, header, buffer.
std::string Image(std::string header, const std::string& buffer, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  std::string out;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + buffer;
}

std::string Bytes(std::initializer_list<int> bytes) {
  std::string s;
  for (int b : bytes) s.push_back(static_cast<char>(b));
  return s;
}

TEST(SafetensorsTest, DtypeNamesAndParsing) {
  EXPECT_STREQ(StDtypeName(StDtype::kF32), "F32");
  EXPECT_STREQ(StDtypeName(StDtype::kF16), "F16");
  EXPECT_STREQ(StDtypeName(StDtype::kBF16), "BF16");
  for (const char* s : {"F32", "f32", "fp32", "float32", "FP32"}) {
    EXPECT_EQ(ParseStDtype(s).value(), StDtype::kF32) << s;
  }
  for (const char* s : {"F16", "f16", "fp16", "float16"}) {
    EXPECT_EQ(ParseStDtype(s).value(), StDtype::kF16) << s;
  }
  for (const char* s : {"BF16", "bf16", "bfloat16"}) {
    EXPECT_EQ(ParseStDtype(s).value(), StDtype::kBF16) << s;
  }
  const auto bad = ParseStDtype("int8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "int8")) << bad.status();
  EXPECT_FALSE(ParseStDtype("").ok());
}

TEST(SafetensorsTest, Fp16ConversionHandComputed) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToF16Bits(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16Bits(-2.0f), 0xc000);
  EXPECT_EQ(FloatToF16Bits(0.0f), 0x0000);
  EXPECT_EQ(FloatToF16Bits(-0.0f), 0x8000);
  EXPECT_EQ(FloatToF16Bits(65504.0f), 0x7bff);  // Largest finite.
  EXPECT_EQ(FloatToF16Bits(65519.0f), 0x7bff);  // Below the halfway point 65520.
  EXPECT_EQ(FloatToF16Bits(65520.0f), 0x7c00);  // Tie rounds to even: infinity.
  EXPECT_EQ(FloatToF16Bits(70000.0f), 0x7c00);
  EXPECT_EQ(FloatToF16Bits(-70000.0f), 0xfc00);
  EXPECT_EQ(FloatToF16Bits(inf), 0x7c00);
  EXPECT_EQ(FloatToF16Bits(-inf), 0xfc00);
  EXPECT_EQ(FloatToF16Bits(0.1f), 0x2e66);
  EXPECT_EQ(FloatToF16Bits(1.0f / 3.0f), 0x3555);
  EXPECT_EQ(FloatToF16Bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // Tie: to even.
  EXPECT_EQ(FloatToF16Bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // Tie: to even.
  EXPECT_EQ(FloatToF16Bits(2049.0f), 0x6800);                           // 2048.
  EXPECT_EQ(FloatToF16Bits(2051.0f), 0x6802);                           // 2052.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1.0f, -14)), 0x0400);             // Smallest normal.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1.0f, -24)), 0x0001);             // Smallest subnormal.
  EXPECT_EQ(FloatToF16Bits(1e-7f), 0x0002);  // 1e-7 * 2^24 = 1.68 -> 2 units of 2^-24.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1.0f, -25)), 0x0000);      // Tie between 0 and 2^-24.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(3.0f, -26)), 0x0001);      // 0.75 units -> 1.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(3.0f, -25)), 0x0002);      // 1.5 units: tie to even 2.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(5.0f, -25)), 0x0002);      // 2.5 units: tie to even 2.
  EXPECT_EQ(FloatToF16Bits(-std::ldexp(1023.0f, -24)), 0x83ff);  // Largest subnormal.
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1023.5f, -24)), 0x0400);   // Rounds up into normals.
  EXPECT_EQ(FloatToF16Bits(1e-30f), 0x0000);
  const uint16_t nan = FloatToF16Bits(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
  EXPECT_NE(FloatToF16Bits(FromBits(0x7f800001u)) & 0x03ff, 0);  // Signalling NaN stays NaN.

  EXPECT_EQ(F16BitsToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16BitsToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(F16BitsToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16BitsToFloat(0x0002), std::ldexp(1.0f, -23));
  EXPECT_EQ(F16BitsToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(Bits(F16BitsToFloat(0x8000)), 0x80000000u);
  EXPECT_EQ(F16BitsToFloat(0x7c00), inf);
  EXPECT_EQ(F16BitsToFloat(0xfc00), -inf);
  EXPECT_TRUE(std::isnan(F16BitsToFloat(0x7e00)));
  // Every non-NaN half survives half -> float -> half.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0) continue;
    ASSERT_EQ(FloatToF16Bits(F16BitsToFloat(static_cast<uint16_t>(h))), h) << h;
  }
}

TEST(SafetensorsTest, Bf16RoundingHandComputed) {
  EXPECT_EQ(FloatToBf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)).bits, 0x3f80);  // Tie: to even.
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)).bits, 0x3f82);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)).bits, 0x3f81);
  EXPECT_EQ(FloatToBf16(3.14159265f).bits, 0x4049);
  EXPECT_EQ(Bf16ToFloat(bf16{0x4049}), 3.140625f);
}

// Random values including the special cases that must survive F32 bit-exactly.
std::vector<float> SpecialAndRandomValues(int n, uint32_t seed) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          inf,
                          -inf,
                          std::numeric_limits<float>::max(),
                          -std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          1e30f,
                          -1e-30f,
                          std::numeric_limits<float>::quiet_NaN(),
                          65504.0f,
                          70000.0f,
                          1e-7f};
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-4.0f, 4.0f);
  while (static_cast<int>(v.size()) < n) {
    v.push_back(rng() % 4 == 0
                    ? FromBits(static_cast<uint32_t>(rng()) & 0xff7fffffu)  // Any finite.
                    : uni(rng));
  }
  return v;
}

HostTensorMap SampleTensors() {
  HostTensorMap m;
  m["model.layers.0.weight"] = {{4, 8}, SpecialAndRandomValues(32, 1)};
  m["bias"] = {{16}, SpecialAndRandomValues(16, 2)};
  m["scalar"] = {{}, {0.5f}};
  m["empty"] = {{0, 3}, {}};
  m["z.big"] = {{3, 5, 7}, SpecialAndRandomValues(105, 3)};
  return m;
}

TEST(SafetensorsTest, F32RoundTripIsBitExactWithMetadata) {
  const HostTensorMap tensors = SampleTensors();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "é ✓ \"q\""}};
  const std::string path = TempPath("f32.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, StDtype::kF32, metadata).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const auto file = ReadSafetensorsFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata, metadata);
  ASSERT_EQ(file->tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const HostTensor& got = file->tensors.at(name);
    EXPECT_EQ(got.shape, t.shape) << name;
    ASSERT_EQ(got.data.size(), t.data.size()) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_EQ(Bits(got.data[i]), Bits(t.data[i])) << name << "[" << i << "]";
    }
    EXPECT_EQ(file->dtypes.at(name), StDtype::kF32);
  }
  // Layout per the spec: header size a multiple of 8, data after it.
  const std::string bytes = ReadBytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + (32 + 16 + 1 + 105) * 4);
}

TEST(SafetensorsTest, Bf16AndF16RoundTripsRound) {
  HostTensorMap tensors = SampleTensors();
  tensors["hand"] = {{6}, {1.0f, 65504.0f, 1e-7f, 70000.0f, -0.0f, 1.0f + std::ldexp(1.0f, -8)}};
  for (StDtype dtype : {StDtype::kBF16, StDtype::kF16}) {
    const std::string path = TempPath(absl::StrCat(StDtypeName(dtype), ".safetensors"));
    ASSERT_TRUE(WriteSafetensorsFile(path, tensors, dtype).ok());
    const auto file = ReadSafetensorsFile(path);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_TRUE(file->metadata.empty());
    EXPECT_EQ(fs::file_size(path) % 2, 0u);
    for (const auto& [name, t] : tensors) {
      EXPECT_EQ(file->dtypes.at(name), dtype);
      const HostTensor& got = file->tensors.at(name);
      EXPECT_EQ(got.shape, t.shape);
      ASSERT_EQ(got.data.size(), t.data.size());
      for (size_t i = 0; i < t.data.size(); ++i) {
        const float want = dtype == StDtype::kBF16 ? Bf16ToFloat(FloatToBf16(t.data[i]))
                                                   : F16BitsToFloat(FloatToF16Bits(t.data[i]));
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got.data[i]));
        } else {
          ASSERT_EQ(Bits(got.data[i]), Bits(want)) << name << "[" << i << "] " << t.data[i];
        }
      }
    }
    const std::vector<float>& hand = file->tensors.at("hand").data;
    EXPECT_EQ(hand[0], 1.0f);
    EXPECT_EQ(Bits(hand[4]), 0x80000000u);
    // 1 + 2^-8: a tie in bf16 (rounds to even 1.0), exact in f16.
    EXPECT_EQ(hand[5], dtype == StDtype::kBF16 ? 1.0f : 1.00390625f);
    if (dtype == StDtype::kF16) {
      EXPECT_EQ(hand[1], 65504.0f);
      EXPECT_EQ(hand[2], std::ldexp(1.0f, -23));
      EXPECT_EQ(hand[3], std::numeric_limits<float>::infinity());
    } else {
      EXPECT_EQ(hand[1], 65536.0f);  // 65504 = 1.11111111111b x 2^15 rounds up in bf16.
      EXPECT_EQ(hand[3], 70144.0f);  // 70000 -> nearest bf16 (step 512).
    }
  }
}

// A file written by hand from the spec: F32, F16, BF16, a scalar and an empty tensor, metadata,
// keys in non-alphabetical order and offsets not in key order.
TEST(SafetensorsTest, ParsesHandWrittenImage) {
  const std::string header = R"({"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},)"
                             R"("__metadata__":{"format":"pt","k":"v"},)"
                             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[14,14]},)"
                             R"("c":{"dtype":"BF16","shape":[],"data_offsets":[12,14]}})";
  const std::string buffer = Bytes({0x00, 0x00, 0x80, 0x3f,  // a[0] = 1.0f
                                    0x00, 0x00, 0x20, 0xc0,  // a[1] = -2.5f
                                    0x00, 0x3c, 0x01, 0x80,  // b = f16 1.0, -2^-24
                                    0x49, 0x40});            // c = bf16 3.140625
  for (bool pad : {true, false}) {
    const auto file = ParseSafetensors(Image(header, buffer, pad), "hand.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ(file->metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}}));
    ASSERT_EQ(file->tensors.size(), 4u);
    EXPECT_EQ(file->tensors.at("a").shape, (Shape{2}));
    EXPECT_EQ(file->tensors.at("a").data, (std::vector<float>{1.0f, -2.5f}));
    EXPECT_EQ(file->tensors.at("b").shape, (Shape{1, 2}));
    EXPECT_EQ(file->tensors.at("b").data, (std::vector<float>{1.0f, -std::ldexp(1.0f, -24)}));
    EXPECT_EQ(file->tensors.at("c").shape, Shape{});
    EXPECT_EQ(file->tensors.at("c").data, (std::vector<float>{3.140625f}));
    EXPECT_EQ(file->tensors.at("e").shape, (Shape{0, 3}));
    EXPECT_TRUE(file->tensors.at("e").data.empty());
    EXPECT_EQ(file->dtypes.at("a"), StDtype::kF32);
    EXPECT_EQ(file->dtypes.at("b"), StDtype::kF16);
    EXPECT_EQ(file->dtypes.at("c"), StDtype::kBF16);
  }
  // The smallest valid file, and a null __metadata__.
  EXPECT_TRUE(ParseSafetensors(Image("{}", ""), "x").value().tensors.empty());
  EXPECT_TRUE(ParseSafetensors(Image(R"({"__metadata__":null})", ""), "x").ok());
}

// The writer's output, byte for byte, against an image assembled by hand.
TEST(SafetensorsTest, WriterMatchesHandWrittenImage) {
  HostTensorMap tensors;
  tensors["w"] = {{2}, {1.0f, -2.0f}};
  tensors["a"] = {{1}, {0.5f}};
  const std::string path = TempPath("exact.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, StDtype::kF16, {{"format", "pt"}}).ok());
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},)"
                             R"("w":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}})";
  EXPECT_EQ(ReadBytes(path), Image(header, Bytes({0x00, 0x38, 0x00, 0x3c, 0x00, 0xc0})));
}

TEST(SafetensorsTest, WriterRejectsBadTensors) {
  const std::string path = TempPath("bad_write.safetensors");
  HostTensorMap wrong_size;
  wrong_size["t.mismatch"] = {{2, 3}, {1.0f}};
  absl::Status s = WriteSafetensorsFile(path, wrong_size, StDtype::kF32);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "t.mismatch")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), path)) << s;
  HostTensorMap reserved;
  reserved["__metadata__"] = {{1}, {1.0f}};
  EXPECT_FALSE(WriteSafetensorsFile(path, reserved, StDtype::kF32).ok());
  HostTensorMap negative;
  negative["neg"] = {{-1}, {}};
  EXPECT_FALSE(WriteSafetensorsFile(path, negative, StDtype::kF32).ok());
  HostTensorMap bad_utf8;
  bad_utf8["\xff"] = {{1}, {1.0f}};
  EXPECT_EQ(WriteSafetensorsFile(path, bad_utf8, StDtype::kF32).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_FALSE(WriteSafetensorsFile("/nonexistent_dir/x.safetensors", {}, StDtype::kF32).ok());
  EXPECT_EQ(ReadSafetensorsFile(TempPath("absent.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

void ExpectSameTensors(const HostTensorMap& got, const HostTensorMap& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, t] : want) {
    ASSERT_EQ(got.count(name), 1u) << name;
    EXPECT_EQ(got.at(name).shape, t.shape) << name;
    ASSERT_EQ(got.at(name).data.size(), t.data.size()) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_EQ(Bits(got.at(name).data[i]), Bits(t.data[i])) << name << "[" << i << "]";
    }
  }
}

TEST(SafetensorsTest, ShardedModelDirectoryRoundTrip) {
  const HostTensorMap tensors = SampleTensors();  // 128, 64, 0, 4 and 420 bytes in F32.
  const std::string dir = TempPath("sharded");
  ASSERT_TRUE(WriteSafetensorsModel(dir, tensors, StDtype::kF32, 192, {{"format", "pt"}}).ok());
  // Name order: bias(64) empty(0) model.layers.0.weight(128) | scalar(4) | z.big(420, alone).
  for (const char* f : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                        "model-00003-of-00003.safetensors", "model.safetensors.index.json"}) {
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  }
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  const auto index = nlohmann::json::parse(ReadBytes(dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 616);
  EXPECT_EQ(index["weight_map"].size(), 5u);
  EXPECT_EQ(index["weight_map"]["bias"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["scalar"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["z.big"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(ReadSafetensorsFile(dir + "/model-00002-of-00003.safetensors")->tensors.size(), 1u);

  for (const std::string& path : {dir, dir + "/model.safetensors.index.json"}) {
    const auto model = ReadSafetensorsModel(path);
    ASSERT_TRUE(model.ok()) << model.status();
    ExpectSameTensors(model->tensors, tensors);
    EXPECT_EQ(model->metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
    EXPECT_EQ(model->dtypes.size(), tensors.size());
  }
  // Rewritten unsharded: one model.safetensors, the stale index is gone.
  ASSERT_TRUE(WriteSafetensorsModel(dir, tensors, StDtype::kBF16).ok());
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  const auto single = ReadSafetensorsModel(dir);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ(single->dtypes.at("bias"), StDtype::kBF16);
  EXPECT_EQ(single->tensors.at("scalar").data, (std::vector<float>{0.5f}));
  EXPECT_EQ(ReadSafetensorsModel(dir + "/model.safetensors")->tensors.size(), tensors.size());
  // And sharded again: the stale single file is removed so the shards are what is read.
  ASSERT_TRUE(WriteSafetensorsModel(dir, tensors, StDtype::kF32, 1).ok());
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(dir + "/model-00005-of-00005.safetensors"));
  ExpectSameTensors(ReadSafetensorsModel(dir).value().tensors, tensors);

  EXPECT_EQ(ReadSafetensorsModel(TempPath("no_model")).status().code(),
            absl::StatusCode::kNotFound);
  const std::string empty_dir = TempPath("empty_dir");
  fs::create_directories(empty_dir);
  EXPECT_EQ(ReadSafetensorsModel(empty_dir + "/").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(WriteSafetensorsModel(dir, tensors, StDtype::kF32, -1).ok());
}

// Writes a sharded model with two shards, then edits its index.
std::string ShardedDirWithIndex(const std::string& name, const nlohmann::json& weight_map) {
  const std::string dir = TempPath(name);
  HostTensorMap tensors;
  tensors["a"] = {{2}, {1.0f, 2.0f}};
  tensors["b"] = {{2}, {3.0f, 4.0f}};
  EXPECT_TRUE(WriteSafetensorsModel(dir, tensors, StDtype::kF32, 8).ok());
  std::ofstream(dir + "/model.safetensors.index.json")
      << nlohmann::json{{"metadata", {{"total_size", 16}}}, {"weight_map", weight_map}}.dump();
  return dir;
}

TEST(SafetensorsTest, ShardedModelIndexErrors) {
  const std::string f1 = "model-00001-of-00002.safetensors";
  const std::string f2 = "model-00002-of-00002.safetensors";
  struct Case {
    nlohmann::json weight_map;
    std::vector<std::string> words;  // The message must contain each.
  };
  const std::vector<Case> cases = {
      {{{"a", f1}, {"b", "missing-shard.safetensors"}}, {"missing-shard.safetensors", "\"b\""}},
      {{{"a", f1}, {"b", f2}, {"c", f2}}, {"\"c\"", "missing from", f2}},  // Tensor not in file.
      {{{"a", f1}, {"b", f1}}, {"\"b\"", f1}},                             // b is not in f1.
      {{{"a", f2}, {"b", f2}}, {"\"a\"", f2}},                             // a is not in f2.
      {{{"a", 5}}, {"\"a\""}},
      {{{"a", "../escape.safetensors"}}, {"\"a\"", "escape"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string dir = ShardedDirWithIndex(absl::StrCat("index_err", i), cases[i].weight_map);
    const auto model = ReadSafetensorsModel(dir);
    ASSERT_FALSE(model.ok()) << i;
    EXPECT_TRUE(absl::StrContains(model.status().message(), "model.safetensors.index.json"))
        << model.status();
    for (const std::string& w : cases[i].words) {
      EXPECT_TRUE(absl::StrContains(model.status().message(), w)) << i << ": " << model.status();
    }
  }
  // A shard file not named by the index is not read: listing only "a" reads only f1.
  const auto only_a = ReadSafetensorsModel(ShardedDirWithIndex("index_only_a", {{"a", f1}}));
  ASSERT_TRUE(only_a.ok()) << only_a.status();
  EXPECT_EQ(only_a->tensors.size(), 1u);
  // A shard holding a tensor that the index maps elsewhere, or does not list at all.
  const std::string dir = ShardedDirWithIndex("index_both", {{"a", f1}, {"b", "both.safetensors"}});
  HostTensorMap both;
  both["a"] = {{1}, {1.0f}};
  both["b"] = {{1}, {2.0f}};
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/both.safetensors", both, StDtype::kF32).ok());
  const std::string index_path = dir + "/model.safetensors.index.json";
  absl::Status s = ReadSafetensorsModel(dir).status();
  EXPECT_TRUE(absl::StrContains(s.message(),
                                "tensor \"a\": found in \"both.safetensors\" but the "
                                "weight_map maps it to \"" +
                                    f1 + "\""))
      << s;
  std::ofstream(index_path) << nlohmann::json{{"weight_map", {{"b", "both.safetensors"}}}}.dump();
  s = ReadSafetensorsModel(dir).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "tensor \"a\": found in \"both.safetensors\" but not"))
      << s;
  // A tensor listed twice (duplicate JSON key), a weight_map that is not an object, bad JSON.
  std::ofstream(index_path) << R"({"weight_map": {"a": ")" << f1 << R"(", "a": ")" << f1 << "\"}}";
  s = ReadSafetensorsModel(dir).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "duplicate key \"a\"")) << s;
  std::ofstream(index_path) << "{\"weight_map\": [1]}";
  EXPECT_TRUE(absl::StrContains(ReadSafetensorsModel(dir).status().message(), "weight_map"));
  std::ofstream(index_path) << "{not json";
  s = ReadSafetensorsModel(dir).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "not valid JSON")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), index_path)) << s;
}

// A tensor entry for the malformed-header cases.
std::string Entry(const std::string& name, const std::string& body) {
  return absl::StrCat("\"", name, "\":", body);
}

TEST(SafetensorsTest, MalformedFilesAreRejectedWithClearMessages) {
  const std::string kName = "bad_model.safetensors";
  const std::string ok_t = Entry("ok.t", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})");
  const std::string four(4, '\0'), eight(8, '\0'), twelve(12, '\0');
  std::string too_long = Image("{}", "");
  too_long[0] = 100;
  std::string over_limit = Image("{}", "");
  over_limit[3] = 0x10;  // 0x10000000 = 268 MB > 100 MB.
  std::string huge = Image("{}", "");
  for (int i = 0; i < 8; ++i) huge[i] = '\xff';
  std::string deep = "{\"deep.t\":";
  for (int i = 0; i < 100; ++i) deep += "[";
  for (int i = 0; i < 100; ++i) deep += "]";
  deep += "}";
  struct Case {
    std::string what;
    std::string image;
    std::string tensor;  // Must appear in the message ("" = none).
    std::string word;    // Must appear in the message too ("" = none).
  };
  const auto T = [&](const std::string& body) {
    return absl::StrCat("{", Entry("bad.t", body), "}");
  };
  const std::vector<Case> cases = {
      {"empty file", "", "", "shorter"},
      {"7 bytes", std::string(7, '\0'), "", "shorter"},
      {"size past the end", too_long, "", "exceeds"},
      {"size over 100 MB", over_limit, "", "limit"},
      {"size 2^64-1", huge, "", ""},
      {"zero header", Image("", "", false), "", "'{'"},
      {"leading space", Image(" {}", ""), "", "'{'"},
      {"array header", Image("[1,2]", ""), "", "'{'"},
      {"not JSON", Image("{\"a\":", ""), "", "JSON"},
      {"trailing garbage", Image("{}x", ""), "", "JSON"},
      {"invalid UTF-8", Image("{\"\xff\":1}", ""), "", "JSON"},
      {"NUL padding", Image(std::string("{}\0\0\0\0\0\0", 8), "", false), "", "JSON"},
      {"too deep", Image(deep, ""), "", "deeper"},
      {"duplicate key", Image(absl::StrCat("{", ok_t, ",", ok_t, "}"), four), "ok.t", "duplicate"},
      {"entry not object", Image(T("5"), ""), "bad.t", "not an object"},
      {"entry array", Image(T("[]"), ""), "bad.t", "not an object"},
      {"no dtype", Image(T(R"({"shape":[1],"data_offsets":[0,4]})"), four), "bad.t", "dtype"},
      {"dtype int", Image(T(R"({"dtype":3,"shape":[1],"data_offsets":[0,4]})"), four), "bad.t",
       "dtype"},
      {"unknown dtype", Image(T(R"({"dtype":"F17","shape":[1],"data_offsets":[0,4]})"), four),
       "bad.t", "F17"},
      {"int dtype", Image(T(R"({"dtype":"I32","shape":[1],"data_offsets":[0,4]})"), four), "bad.t",
       "unsupported dtype \"I32\""},
      {"bool dtype", Image(T(R"({"dtype":"BOOL","shape":[4],"data_offsets":[0,4]})"), four),
       "bad.t", "unsupported dtype \"BOOL\""},
      {"lower-case dtype", Image(T(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})"), four),
       "bad.t", "f32"},
      {"no shape", Image(T(R"({"dtype":"F32","data_offsets":[0,4]})"), four), "bad.t", "shape"},
      {"shape string", Image(T(R"({"dtype":"F32","shape":"1","data_offsets":[0,4]})"), four),
       "bad.t", "shape"},
      {"shape float", Image(T(R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})"), four),
       "bad.t", "not an integer"},
      {"shape null", Image(T(R"({"dtype":"F32","shape":[null],"data_offsets":[0,4]})"), four),
       "bad.t", "not an integer"},
      {"negative dim", Image(T(R"({"dtype":"F32","shape":[-1,-4],"data_offsets":[0,4]})"), four),
       "bad.t", "negative"},
      {"product overflows",
       Image(T(R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})"), ""),
       "bad.t", "overflow"},
      {"dim over int64",
       Image(T(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]})"), four),
       "bad.t", "overflow"},
      {"bytes overflow",
       Image(T(R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]})"), ""),
       "bad.t", ""},
      {"no offsets", Image(T(R"({"dtype":"F32","shape":[1]})"), four), "bad.t", "data_offsets"},
      {"offsets object", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":{}})"), four),
       "bad.t", "data_offsets"},
      {"three offsets", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,4]})"), four),
       "bad.t", "data_offsets"},
      {"negative offset", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), four),
       "bad.t", "data_offsets"},
      {"string offset", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":["0",4]})"), four),
       "bad.t", "data_offsets"},
      {"end < begin", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})"), four),
       "bad.t", "end < begin"},
      {"size mismatch", Image(T(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), eight),
       "bad.t", "needs"},
      {"f16 size mismatch", Image(T(R"({"dtype":"F16","shape":[2],"data_offsets":[0,8]})"), eight),
       "bad.t", "needs"},
      {"beyond buffer", Image(T(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), four),
       "bad.t", "exceed"},
      {"huge offsets",
       Image(T(R"({"dtype":"F32","shape":[1],)"
               R"("data_offsets":[18446744073709551611,18446744073709551615]})"),
             four),
       "bad.t", "exceed"},
      {"overlap",
       Image(absl::StrCat("{", Entry("a.t", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"),
                          ",", Entry("b.t", R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})"),
                          "}"),
             twelve),
       "b.t", "overlap"},
      {"same range",
       Image(absl::StrCat("{", Entry("a.t", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})"),
                          ",", Entry("b.t", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})"),
                          "}"),
             four),
       "b.t", "overlap"},
      {"empty inside another",
       Image(absl::StrCat("{", Entry("a.t", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"),
                          ",", Entry("b.t", R"({"dtype":"F32","shape":[0],"data_offsets":[4,4]})"),
                          "}"),
             eight),
       "b.t", "overlap"},
      {"hole",
       Image(absl::StrCat("{", Entry("a.t", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})"),
                          ",", Entry("b.t", R"({"dtype":"F32","shape":[1],"data_offsets":[8,12]})"),
                          "}"),
             twelve),
       "b.t", "no tensor"},
      {"hole at start", Image(T(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})"), eight),
       "bad.t", "no tensor"},
      {"trailing bytes", Image(absl::StrCat("{", ok_t, "}"), eight), "", "no tensor"},
      {"bytes without tensors", Image("{}", four), "", "no tensor"},
      {"metadata not object", Image(R"({"__metadata__":"x"})", ""), "", "__metadata__"},
      {"metadata value int", Image(R"({"__metadata__":{"epoch.k":1}})", ""), "epoch.k",
       "not a string"},
      {"metadata value null", Image(R"({"__metadata__":{"n.k":null}})", ""), "n.k", "not a string"},
  };
  for (const Case& c : cases) {
    const auto file = ParseSafetensors(c.image, kName);
    ASSERT_FALSE(file.ok()) << c.what;
    const absl::Status& s = file.status();
    EXPECT_TRUE(s.code() == absl::StatusCode::kInvalidArgument ||
                s.code() == absl::StatusCode::kDataLoss)
        << c.what << ": " << s;
    EXPECT_TRUE(absl::StrContains(s.message(), kName)) << c.what << ": " << s;
    if (!c.tensor.empty()) {
      EXPECT_TRUE(absl::StrContains(s.message(), "\"" + c.tensor + "\"")) << c.what << ": " << s;
    }
    if (!c.word.empty()) {
      EXPECT_TRUE(absl::StrContains(s.message(), c.word)) << c.what << ": " << s;
    }
  }
  // The same through a file on disk names the path.
  const std::string path = TempPath("bad_on_disk.safetensors");
  std::ofstream(path, std::ios::binary)
      << std::find_if(cases.begin(), cases.end(), [](const Case& c) {
           return c.what == "entry not object";
         })->image;
  const auto from_disk = ReadSafetensorsFile(path);
  ASSERT_FALSE(from_disk.ok());
  EXPECT_TRUE(absl::StrContains(from_disk.status().message(), path)) << from_disk.status();
}

uint64_t HeaderSize(const std::string& image) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(image[i]);
  return n;
}

void SetHeaderSize(std::string* image, uint64_t n) {
  for (int i = 0; i < 8; ++i) (*image)[i] = static_cast<char>((n >> (8 * i)) & 0xff);
}

// Checks a successfully parsed file for internal consistency.
void CheckConsistent(const SafetensorsFile& file, size_t image_size) {
  uint64_t stored = 0;
  ASSERT_EQ(file.dtypes.size(), file.tensors.size());
  for (const auto& [name, t] : file.tensors) {
    ASSERT_EQ(file.dtypes.count(name), 1u) << name;
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      ASSERT_GE(d, 0);
      ASSERT_TRUE(d == 0 || numel <= std::numeric_limits<uint64_t>::max() / d);
      numel *= static_cast<uint64_t>(d);
    }
    ASSERT_EQ(t.data.size(), numel) << name;
    stored += numel * StDtypeSize(file.dtypes.at(name));
  }
  ASSERT_LE(stored + 8, image_size);
}

TEST(SafetensorsTest, FuzzedImagesNeverCrash) {
  // Seeds: a hand-written mixed-dtype image and writer output with metadata.
  std::vector<std::string> seeds;
  seeds.push_back(Image(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},)"
      R"("c":{"dtype":"BF16","shape":[],"data_offsets":[12,14]},)"
      R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[14,14]}})",
      Bytes({0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0, 0, 0x3c, 1, 0x80, 0x49, 0x40})));
  HostTensorMap small;
  small["x.w"] = {{2, 3}, {1, 2, 3, 4, 5, 6}};
  small["x.b"] = {{3}, {-1, 0, 1}};
  for (StDtype dtype : {StDtype::kF32, StDtype::kBF16}) {
    const std::string path = TempPath("fuzz_seed.safetensors");
    ASSERT_TRUE(WriteSafetensorsFile(path, small, dtype, {{"k", "v"}}).ok());
    seeds.push_back(ReadBytes(path));
  }
  for (const std::string& s : seeds) ASSERT_TRUE(ParseSafetensors(s, "seed").ok());

  std::mt19937 rng(FuzzSeed(20240607));
  const auto rand_byte = [&] { return static_cast<char>(rng() & 0xff); };
  const char kJsonChars[] = "{}[]\",:0123456789-. eE\\FBI";
  int parsed = 0, rewritten = 0;
  for (int iter = 0, n = FuzzIterations(20000); iter < n; ++iter) {
    const std::string& seed = seeds[rng() % seeds.size()];
    std::string img;
    switch (iter % 8) {
      case 0: {  // Random bytes, half with a plausible header size in front.
        const size_t len = rng() % 120;
        for (size_t i = 0; i < len; ++i) img.push_back(rand_byte());
        if (rng() % 2 == 0 && len >= 8) {
          const uint64_t n = rng() % (len - 7);
          for (int i = 0; i < 8; ++i) img[i] = static_cast<char>((n >> (8 * i)) & 0xff);
          if (len > 8) img[8] = '{';
        }
        break;
      }
      case 1:  // Truncation.
        img = seed.substr(0, rng() % seed.size());
        break;
      case 2: {  // Header length edited by a small amount, or set to anything.
        img = seed;
        SetHeaderSize(&img, rng() % 4 == 0 ? (static_cast<uint64_t>(rng()) << 32 | rng())
                                           : HeaderSize(seed) + rng() % 17 - 8);
        break;
      }
      case 3:  // Random byte flips anywhere.
        img = seed;
        for (int k = 1 + rng() % 4; k > 0; --k) img[rng() % img.size()] ^= 1 << (rng() % 8);
        break;
      default: {  // JSON-ish edits inside the header: replace, insert or delete characters.
        img = seed;
        for (int k = 1 + rng() % 3; k > 0; --k) {
          const size_t pos = 8 + rng() % (img.size() - 8);
          const char c = kJsonChars[rng() % (sizeof(kJsonChars) - 1)];
          switch (rng() % 3) {
            case 0:
              img[pos] = c;
              break;
            case 1:
              img.insert(img.begin() + pos, c);
              break;
            default:
              img.erase(pos, 1);
          }
        }
        if (rng() % 2 == 0) {  // Keep the size field consistent with the header edits.
          SetHeaderSize(&img, HeaderSize(seed) + img.size() - seed.size());
        }
      }
    }
    const auto file = ParseSafetensors(img, "fuzz.safetensors");
    if (!file.ok()) {
      const absl::StatusCode code = file.status().code();
      ASSERT_TRUE(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kDataLoss)
          << file.status();
      ASSERT_TRUE(absl::StrContains(file.status().message(), "fuzz.safetensors"));
      continue;
    }
    ++parsed;
    CheckConsistent(*file, img.size());
    if (rewritten < 10 && !file->tensors.empty()) {  // What was read writes back identically.
      ++rewritten;
      const std::string path = TempPath("fuzz_rewrite.safetensors");
      ASSERT_TRUE(WriteSafetensorsFile(path, file->tensors, StDtype::kF32, file->metadata).ok());
      const auto again = ReadSafetensorsFile(path);
      ASSERT_TRUE(again.ok()) << again.status();
      ExpectSameTensors(again->tensors, file->tensors);
      EXPECT_EQ(again->metadata, file->metadata);
    }
  }
  EXPECT_GT(parsed, 0);  // Some mutations keep a valid file (e.g. a flipped value byte).
}

}  // namespace
}  // namespace eellm
