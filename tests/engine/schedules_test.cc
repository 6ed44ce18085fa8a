// Learning-rate schedules (engine/optim/schedules.h): the warm-up, each of Megatron's decay
// styles at its landmarks, min_lr from the decay's end, and the loss-weight ramps.
#include "engine/optim/schedules.h"

#include <cmath>

#include "gtest/gtest.h"

namespace eellm {
namespace {

LrSchedule Make(LrDecay d) {
  LrSchedule s;
  s.max_lr = 3e-3;
  s.min_lr = 3e-4;
  s.warmup = 10;
  s.decay_steps = 110;
  s.decay = d;
  return s;
}

TEST(LearningRate, WarmsUpLinearlyInEveryStyle) {
  for (LrDecay d :
       {LrDecay::kCosine, LrDecay::kLinear, LrDecay::kConstant, LrDecay::kInverseSquareRoot}) {
    const LrSchedule s = Make(d);
    EXPECT_DOUBLE_EQ(LearningRate(0, s), 3e-4);  // max_lr (step + 1) / warmup
    EXPECT_DOUBLE_EQ(LearningRate(4, s), 1.5e-3);
    EXPECT_DOUBLE_EQ(LearningRate(9, s), 3e-3);
  }
}

TEST(LearningRate, DecaysInEachStyle) {
  const LrSchedule cosine = Make(LrDecay::kCosine), linear = Make(LrDecay::kLinear);
  // Progress p = (step - 10) / 100.
  EXPECT_DOUBLE_EQ(LearningRate(10, cosine), 3e-3);
  EXPECT_NEAR(LearningRate(60, cosine), 1.65e-3, 1e-15);  // p = 1/2: the middle
  EXPECT_NEAR(LearningRate(35, cosine), 3e-4 + 2.7e-3 * 0.5 * (1 + std::cos(M_PI / 4)), 1e-15);
  EXPECT_NEAR(LearningRate(60, linear), 1.65e-3, 1e-15);
  EXPECT_NEAR(LearningRate(35, linear), 3e-4 + 2.7e-3 * 0.75, 1e-15);
  for (const LrSchedule& s : {cosine, linear}) {
    EXPECT_DOUBLE_EQ(LearningRate(110, s), 3e-4);  // min_lr from decay_steps on
    EXPECT_DOUBLE_EQ(LearningRate(500, s), 3e-4);
  }
  EXPECT_DOUBLE_EQ(LearningRate(500, Make(LrDecay::kConstant)), 3e-3);
  // Inverse square root: max_lr sqrt(warmup / (step + 1)), down to min_lr.
  const LrSchedule isr = Make(LrDecay::kInverseSquareRoot);
  EXPECT_DOUBLE_EQ(LearningRate(39, isr), 1.5e-3);  // 4 x warmup steps: half
  EXPECT_DOUBLE_EQ(LearningRate(999, isr), 3e-4);   // 3e-3 / 10 = min_lr
  EXPECT_DOUBLE_EQ(LearningRate(99999, isr), 3e-4);
  // Without a warm-up the decay starts at max_lr.
  LrSchedule none = cosine;
  none.warmup = 0;
  EXPECT_DOUBLE_EQ(LearningRate(0, none), 3e-3);
}

TEST(LearningRate, StylesAreNamed) {
  EXPECT_EQ(*ParseLrDecay("cosine"), LrDecay::kCosine);
  EXPECT_EQ(*ParseLrDecay("linear"), LrDecay::kLinear);
  EXPECT_EQ(*ParseLrDecay("constant"), LrDecay::kConstant);
  EXPECT_EQ(*ParseLrDecay("inverse-square-root"), LrDecay::kInverseSquareRoot);
  auto bad = ParseLrDecay("exponential");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("\"exponential\""), std::string::npos);
}

TEST(Ramp, GoesFromStartToEnd) {
  EXPECT_DOUBLE_EQ(Ramp(0, 10, 0.1, 0.5, false), 0.1);
  EXPECT_DOUBLE_EQ(Ramp(5, 10, 0.1, 0.5, false), 0.3);
  EXPECT_DOUBLE_EQ(Ramp(5, 10, 0.1, 0.5, true), 0.3);  // the cosine ramp's middle
  EXPECT_DOUBLE_EQ(Ramp(10, 10, 0.1, 0.5, true), 0.5);
  EXPECT_DOUBLE_EQ(Ramp(3, 0, 0.1, 0.5, false), 0.5);
}

}  // namespace
}  // namespace eellm
