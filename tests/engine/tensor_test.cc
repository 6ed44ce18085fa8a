// Tests of the tensor layer: bf16 conversion (round to nearest even), Buffer, ParamStore layout
// and gradient zeroing, and the MakeBackend factory.
#include "engine/tensor/tensor.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "engine/backend.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "engine/tensor/param_store.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(Bf16Test, ExactValuesRoundTrip) {
  for (float f : {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 3.0e38f, 1.0e-38f}) {
    const float r = Bf16ToFloat(FloatToBf16(f));
    if (f == 3.0e38f || f == 1.0e-38f) {
      EXPECT_NEAR(r, f, std::fabs(f) / 128.0f);  // not exactly representable
    } else {
      EXPECT_EQ(r, f);
      EXPECT_EQ(std::signbit(r), std::signbit(f));
    }
  }
  EXPECT_EQ(FloatToBf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f).bits, 0xc000);
}

TEST(Bf16Test, EveryBf16ValueRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const bf16 h{static_cast<uint16_t>(bits)};
    const float f = Bf16ToFloat(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f))));
    } else {
      ASSERT_EQ(FloatToBf16(f).bits, h.bits) << std::hex << bits;
    }
  }
}

TEST(Bf16Test, RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between 1 (0x3f80, even) and 1 + 2^-7 (0x3f81): rounds to even.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)).bits, 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 0x3f81 (odd) and 0x3f82 (even): rounds up to even.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)).bits, 0x3f82);
  // Just above / below the halfway point round to nearest.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)).bits, 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f817fffu)).bits, 0x3f81);
  // Negative numbers round symmetrically.
  EXPECT_EQ(FloatToBf16(FromBits(0xbf808000u)).bits, 0xbf80);
  EXPECT_EQ(FloatToBf16(FromBits(0xbf818000u)).bits, 0xbf82);
  // Rounding can carry into the exponent: the largest float below 2 rounds to 2.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(FromBits(0x3fffffffu))), 2.0f);
}

TEST(Bf16Test, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(inf)), inf);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-inf)), -inf);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low bits must stay NaN, not become infinity.
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0x7f800001u)))));
  // The largest finite float rounds up to infinity.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::max())), inf);
}

std::unique_ptr<Backend> Cpu() {
  auto be = MakeBackend("cpu");
  EE_CHECK_OK(be.status());
  return std::move(be).value();
}

TEST(BufferTest, AllocatesAndMoves) {
  auto be = Cpu();
  Buffer a(be.get(), 100);
  ASSERT_NE(a.data(), nullptr);
  EXPECT_EQ(a.bytes(), 100u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  void* p = a.data();
  Buffer b = std::move(a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  Buffer empty(be.get(), 0);
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(NumElements({2, 3, 4}), 24);
  EXPECT_EQ(ShapeToString({2, 3}), "[2, 3]");
}

TEST(ParamStoreTest, LayoutFindAndZeroGrads) {
  auto be = Cpu();
  ParamStore store;
  const int a = store.Add("wte.weight", {7, 3}, true);
  const int b = store.Add("ln.bias", {5}, false);
  const int c = store.Add("fc.weight", {16, 2}, true);
  const int d = store.Add("scalar", {1}, false);
  EXPECT_EQ(a, 0);
  EXPECT_EQ(d, 3);
  EXPECT_EQ(store.Find("ln.bias"), b);
  EXPECT_EQ(store.Find("fc.weight"), c);
  EXPECT_EQ(store.Find("missing"), -1);
  size_t end = 0;
  for (const ParamInfo& p : store.params()) {
    EXPECT_EQ(p.offset % 16, 0u) << p.name;
    EXPECT_GE(p.offset, end) << p.name << " overlaps the previous parameter";
    EXPECT_EQ(p.numel, static_cast<size_t>(NumElements(p.shape)));
    end = p.offset + p.numel;
  }
  EXPECT_EQ(store.size(), end);
  EXPECT_FALSE(store.params()[b].weight_decay);
  EXPECT_TRUE(store.params()[a].weight_decay);

  store.Allocate(be.get());
  ASSERT_TRUE(store.allocated());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(store.param(c)) % 64, 0u);
  for (size_t i = 0; i < store.size(); ++i) {
    ASSERT_EQ(store.params_data()[i], 0.0f);
    ASSERT_EQ(store.grads_data()[i], 0.0f);
  }
  EXPECT_EQ(store.grad(c) - store.grads_data(), static_cast<ptrdiff_t>(store.params()[c].offset));
  be->Fill(store.grads_data(), store.size(), 1.5f);
  store.ZeroGrads();
  for (size_t i = 0; i < store.size(); ++i) ASSERT_EQ(store.grads_data()[i], 0.0f);
}

TEST(MakeBackendTest, NamesAndErrors) {
  auto cpu = MakeBackend("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");
  EXPECT_EQ((*cpu)->device(), Device::kCpu);

  auto bad = MakeBackend("nope");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("nope"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("cpu"), std::string::npos) << bad.status();

  // "cuda" is a known name: it either works or says it is unavailable, never "unknown".
  auto cuda = MakeBackend("cuda");
  if (!cuda.ok()) {
    EXPECT_NE(cuda.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace eellm
