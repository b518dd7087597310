// HF learning-rate schedules and the warmup rule, against values worked out by hand
// from transformers/optimization.py's lambdas.
#include <cmath>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>

#include "core/schedule.h"

namespace {

dpo::ScheduleOptions opts(const std::string& type, int64_t warmup, int64_t total, double lr = 1.0) {
  dpo::ScheduleOptions o;
  o.type = type;
  o.warmup_steps = warmup;
  o.total_steps = total;
  o.base_lr = lr;
  return o;
}

const double kPi = std::acos(-1.0);

// Scalar fp64 on both sides (glibc's libm, not ATen's kernels): the cosine's argument
// pi * cycles * 2 * progress rounds <= 2 times (2u pi absolute), cos is within 1 ulp, 1 + cos
// and the products round once each: <= (2 pi + 4) u of values <= 1; the hand-worked values
// (sqrt, cos, sums) as much again: 24u ~ 2.7e-15.
const double kTol = 24 * 0x1p-53;

}  // namespace

TEST(Schedule, CosineWithWarmupAtChosenSteps) {
  // The stack_llama_2 setting: 100 warmup steps, 1000 steps.
  const auto o = opts("cosine", 100, 1000, 5e-4);
  // Warmup and linear values are one correctly rounded division: EXPECT_DOUBLE_EQ's 4 ulps.
  EXPECT_EQ(dpo::lr_multiplier(o, 0), 0.0);                // first update: lr 0 (HF LambdaLR)
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 1), 0.01);        // 1 / 100
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 50), 0.5);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 99), 0.99);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 100), 1.0);       // warmup end: cos(0)
  EXPECT_NEAR(dpo::lr_multiplier(o, 325), 0.5 + std::sqrt(2.0) / 4, kTol);  // progress 1/4
  EXPECT_NEAR(dpo::lr_multiplier(o, 550), 0.5, kTol);     // progress 1/2
  EXPECT_NEAR(dpo::lr_multiplier(o, 999), 0.5 * (1 + std::cos(kPi * 899.0 / 900.0)), kTol);
  EXPECT_NEAR(dpo::lr_multiplier(o, 1000), 0.0, kTol);    // final
  EXPECT_NEAR(dpo::lr_at(o, 550), 2.5e-4, kTol * 5e-4);   // base_lr times the multiplier
}

TEST(Schedule, CosineNeverNegativeAndFullCycleReturns) {
  auto o = opts("cosine", 0, 10);
  o.num_cycles = 1.0;  // a full wave: back to 1 at the end
  EXPECT_NEAR(dpo::lr_multiplier(o, 5), 0.0, kTol);
  EXPECT_NEAR(dpo::lr_multiplier(o, 10), 1.0, kTol);
  o.num_cycles = 0.5;
  for (int64_t s = 0; s <= 20; ++s) EXPECT_GE(dpo::lr_multiplier(o, s), 0.0) << s;
}

TEST(Schedule, LinearWithWarmup) {
  const auto o = opts("linear", 10, 110);
  EXPECT_EQ(dpo::lr_multiplier(o, 0), 0.0);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 5), 0.5);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 10), 1.0);        // (110 - 10) / 100
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 60), 0.5);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 109), 0.01);
  EXPECT_EQ(dpo::lr_multiplier(o, 110), 0.0);
  EXPECT_EQ(dpo::lr_multiplier(o, 150), 0.0);              // clamped past the end
  // No warmup: the first update uses the full rate.
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(opts("linear", 0, 4), 0), 1.0);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(opts("linear", 0, 4), 3), 0.25);
}

TEST(Schedule, ConstantIgnoresWarmupConstantWithWarmupDoesNot) {
  EXPECT_EQ(dpo::lr_multiplier(opts("constant", 10, 0), 0), 1.0);
  EXPECT_EQ(dpo::lr_multiplier(opts("constant", 10, 0), 12345), 1.0);
  const auto o = opts("constant_with_warmup", 4, 0);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 1), 0.25);
  EXPECT_EQ(dpo::lr_multiplier(o, 4), 1.0);
  EXPECT_EQ(dpo::lr_multiplier(o, 400), 1.0);
}

TEST(Schedule, WarmupLongerThanTraining) {
  // HF: warmup ramps as step / W even if W > S; linear decay divides by max(1, S - W).
  const auto o = opts("linear", 20, 10);
  EXPECT_DOUBLE_EQ(dpo::lr_multiplier(o, 5), 0.25);
}

TEST(Schedule, WarmupStepsRule) {
  EXPECT_EQ(dpo::warmup_steps_from(100, 0.5, 1000), 100);  // steps win when > 0
  EXPECT_EQ(dpo::warmup_steps_from(0, 0.1, 1000), 100);
  EXPECT_EQ(dpo::warmup_steps_from(0, 0.03, 333), 10);     // ceil(9.99)
  EXPECT_EQ(dpo::warmup_steps_from(0, 0.1, 7), 1);         // ceil(0.7)
  EXPECT_EQ(dpo::warmup_steps_from(0, 0.0, 1000), 0);
  EXPECT_THROW(dpo::warmup_steps_from(0, 1.5, 10), std::runtime_error);
  EXPECT_THROW(dpo::warmup_steps_from(-1, 0.0, 10), std::runtime_error);
}

TEST(Schedule, Validation) {
  try {
    dpo::lr_multiplier(opts("polynomial", 0, 10), 0);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("--lr_scheduler_type"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("cosine"), std::string::npos);
  }
  EXPECT_THROW(dpo::lr_multiplier(opts("cosine", 0, 0), 0), std::runtime_error);  // needs total steps
  EXPECT_THROW(dpo::lr_multiplier(opts("linear", 0, 10), -1), std::runtime_error);
  EXPECT_THROW(dpo::lr_multiplier(opts("linear", -2, 10), 0), std::runtime_error);
}
