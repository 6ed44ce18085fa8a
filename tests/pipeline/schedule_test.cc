// Pipeline schedules as data (parallel/pipeline/schedule.h) and their cost-model simulator
// (simulator.h): structural invariants of AFAB, 1F1B and interleaved 1F1B checked here by
// independent code, send/receive pairing, activation memory bounds, exact bubble formulas,
// exit-head placement, deadlock detection and the text rendering. No compute, no MPI.
#include "parallel/pipeline/schedule.h"

#include <cstdio>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/pipeline/simulator.h"

namespace eellm {
namespace {

using T = ActionType;

// Every schedule the tests sweep: AFAB and 1F1B for stages {1,2,4} x microbatches {1,2,4,8},
// interleaved with 2 chunks where microbatches % stages == 0.
std::vector<Schedule> AllSchedules() {
  std::vector<Schedule> out;
  for (int p : {1, 2, 4}) {
    for (int m : {1, 2, 4, 8}) {
      out.push_back(AllForwardAllBackward(p, m));
      out.push_back(OneFOneB(p, m));
      if (m % p == 0) {
        absl::StatusOr<Schedule> s = Interleaved1F1B(p, m, 2);
        EXPECT_TRUE(s.ok()) << s.status();
        if (s.ok()) out.push_back(*s);
      }
    }
  }
  return out;
}

std::string Label(const Schedule& s) {
  return s.name + " p=" + std::to_string(s.stages) + " m=" + std::to_string(s.microbatches) +
         " v=" + std::to_string(s.chunks);
}

// Index of `a` in the stage's list, -1 if absent; fails the test if it appears twice.
int Find(const Schedule& s, int stage, Action a) {
  int at = -1;
  for (int i = 0; i < static_cast<int>(s.per_stage[stage].size()); ++i) {
    if (s.per_stage[stage][i] == a) {
      EXPECT_EQ(at, -1) << Label(s) << " stage " << stage << ": " << ActionString(a) << " twice";
      at = i;
    }
  }
  return at;
}

TEST(PipelineSchedule, EveryMicrobatchOneForwardThenOneBackwardPerChunk) {
  for (const Schedule& s : AllSchedules()) {
    SCOPED_TRACE(Label(s));
    ASSERT_EQ(static_cast<int>(s.per_stage.size()), s.stages);
    for (int st = 0; st < s.stages; ++st) {
      int computes = 0;
      for (const Action& a : s.per_stage[st])
        computes += a.type == T::kForward || a.type == T::kBackward;
      EXPECT_EQ(computes, 2 * s.microbatches * s.chunks) << "stage " << st;
      for (int c = 0; c < s.chunks; ++c) {
        for (int m = 0; m < s.microbatches; ++m) {
          const int f = Find(s, st, {T::kForward, m, c}), b = Find(s, st, {T::kBackward, m, c});
          EXPECT_GE(f, 0) << "stage " << st << " mb " << m << " chunk " << c;
          EXPECT_GT(b, f) << "stage " << st << " mb " << m << " chunk " << c;
        }
      }
    }
    EXPECT_TRUE(ValidateSchedule(s).ok()) << ValidateSchedule(s) << "\n" << ScheduleString(s);
  }
}

TEST(PipelineSchedule, SendsAndReceivesPairUpBetweenNeighbours) {
  for (const Schedule& s : AllSchedules()) {
    SCOPED_TRACE(Label(s));
    const int p = s.stages, last = p * s.chunks - 1;
    // (from stage, to stage, direction) -> (microbatch, receiving virtual stage), in order.
    std::map<std::tuple<int, int, int>, std::vector<std::pair<int, int>>> sends, recvs;
    for (int st = 0; st < p; ++st) {
      for (const Action& a : s.per_stage[st]) {
        const int v = a.chunk * p + st;
        if (a.type == T::kSendForward) sends[{st, (v + 1) % p, 0}].push_back({a.microbatch, v + 1});
        if (a.type == T::kRecvForward) recvs[{(v - 1 + p) % p, st, 0}].push_back({a.microbatch, v});
        if (a.type == T::kSendBackward)
          sends[{st, (v - 1 + p) % p, 1}].push_back({a.microbatch, v - 1});
        if (a.type == T::kRecvBackward) recvs[{(v + 1) % p, st, 1}].push_back({a.microbatch, v});
        if (a.type == T::kSendForward || a.type == T::kRecvBackward) {
          EXPECT_LT(v, last);
        }
        if (a.type == T::kRecvForward || a.type == T::kSendBackward) {
          EXPECT_GT(v, 0);
        }
      }
      // Receives right before the compute needing them, sends right after the producing one.
      for (int c = 0; c < s.chunks; ++c) {
        const int v = c * p + st;
        for (int m = 0; m < s.microbatches; ++m) {
          const int f = Find(s, st, {T::kForward, m, c}), b = Find(s, st, {T::kBackward, m, c});
          EXPECT_EQ(Find(s, st, {T::kRecvForward, m, c}), v > 0 ? f - 1 : -1);
          EXPECT_EQ(Find(s, st, {T::kSendForward, m, c}), v < last ? f + 1 : -1);
          EXPECT_EQ(Find(s, st, {T::kRecvBackward, m, c}), v < last ? b - 1 : -1);
          EXPECT_EQ(Find(s, st, {T::kSendBackward, m, c}), v > 0 ? b + 1 : -1);
        }
      }
    }
    EXPECT_EQ(sends, recvs) << ScheduleString(s);
    // Consistent order: the simulator runs it to the end (no deadlock) with any costs.
    for (double f : {1.0, 3.0}) {
      absl::StatusOr<Timeline> t = Simulate(s, UniformCosts(p, f, 2.0, 0.0));
      EXPECT_TRUE(t.ok()) << t.status() << "\n" << ScheduleString(s);
    }
  }
}

TEST(PipelineSchedule, MaxInFlight) {
  for (int p : {1, 2, 4}) {
    for (int m : {1, 2, 4, 8}) {
      const Schedule one = OneFOneB(p, m), afab = AllForwardAllBackward(p, m);
      for (int st = 0; st < p; ++st) {
        EXPECT_LE(MaxInFlight(one, st), p - st) << "p=" << p << " m=" << m << " stage " << st;
        EXPECT_EQ(MaxInFlight(one, st), std::min(p - st, m)) << "p=" << p << " m=" << m;
        EXPECT_EQ(MaxInFlight(afab, st), m) << "p=" << p << " m=" << m << " stage " << st;
      }
    }
  }
}

TEST(PipelineSchedule, InterleavedRejectsBadSizes) {
  absl::StatusOr<Schedule> s = Interleaved1F1B(4, 6, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("(6)"), std::string::npos) << s.status();
  EXPECT_NE(s.status().message().find("(4)"), std::string::npos) << s.status();
  EXPECT_FALSE(Interleaved1F1B(0, 4, 2).ok());
  EXPECT_FALSE(Interleaved1F1B(2, 4, 0).ok());
  // One chunk is plain 1F1B.
  absl::StatusOr<Schedule> one = Interleaved1F1B(4, 6, 1);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->per_stage, OneFOneB(4, 6).per_stage);
}

// Bubble definitions tested (uniform per-chunk costs f = 1, b = 2, e = 0, no latency; all sums
// of small integers, so the doubles are exact and compared with ==):
// - Megatron's bubble fraction = bubble time / ideal time = total idle / total busy:
//   (p - 1) / m for AFAB and 1F1B, (p - 1) / (v * m) for interleaved 1F1B.
// - share of device time idle = total idle / (p * makespan): (p - 1) / (m + p - 1), and
//   (p - 1) / (v * m + p - 1) interleaved; makespan = (v * m + p - 1) * (f + b).
TEST(PipelineSimulator, BubbleMatchesFormulasExactly) {
  for (const Schedule& s : AllSchedules()) {
    SCOPED_TRACE(Label(s));
    const int p = s.stages, m = s.microbatches, v = s.chunks;
    absl::StatusOr<Timeline> t = Simulate(s, UniformCosts(p, 1.0, 2.0, 0.0));
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->makespan, 3.0 * (v * m + p - 1));
    EXPECT_EQ(BubbleOverIdeal(*t), static_cast<double>(p - 1) / (v * m));
    EXPECT_EQ(BubbleFraction(*t), static_cast<double>(p - 1) / (v * m + p - 1));
    for (int st = 0; st < p; ++st) {
      EXPECT_EQ(t->busy_time[st], 3.0 * v * m);
      EXPECT_EQ(t->idle_time[st], 3.0 * (p - 1));
    }
  }
}

TEST(PipelineSimulator, LatencyAddsTwoHopsPerStageBoundary) {
  PipelineCosts c = UniformCosts(2, 1.0, 2.0, 0.0);
  c.p2p_latency = 0.25;
  absl::StatusOr<Timeline> t = Simulate(OneFOneB(2, 1), c);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->makespan, 6.5);  // F0 | hop | F1 B1 | hop | B0
}

TEST(PipelineSimulator, RejectsBadCosts) {
  EXPECT_FALSE(Simulate(OneFOneB(2, 2), UniformCosts(3, 1, 2, 0)).ok());
  EXPECT_FALSE(Simulate(OneFOneB(2, 2), UniformCosts(2, -1, 2, 0)).ok());
}

TEST(PipelineSimulator, RenderTimeline) {
  absl::StatusOr<Timeline> t = Simulate(OneFOneB(2, 1), UniformCosts(2, 1.0, 2.0, 0.0));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(RenderTimeline(*t, 6), "stage 0 |F...BB|\nstage 1 |.FBB..|\n");
}

// Swapping a send and the receive that depends on it makes a stage wait for a gradient before it
// sends the activations that gradient needs: the simulator reports the deadlock (naming who
// waits for what) instead of hanging. With one microbatch on two stages the swap keeps the
// structure valid (the validator cannot see cycles); in 1F1B(4, 8) it also reorders sends.
TEST(PipelineSimulator, DetectsDeadlock) {
  auto swap_first = [](std::vector<Action>& l, T a, T b) {
    int i = -1, j = -1;
    for (int k = 0; k < static_cast<int>(l.size()); ++k) {
      if (i < 0 && l[k].type == a) i = k;
      if (j < 0 && l[k].type == b) j = k;
    }
    ASSERT_TRUE(i >= 0 && j >= 0);
    std::swap(l[i], l[j]);
  };
  Schedule small = OneFOneB(2, 1);  // stage 0: F(0) SF(0) RB(0) B(0)
  swap_first(small.per_stage[0], T::kSendForward, T::kRecvBackward);
  EXPECT_TRUE(ValidateSchedule(small).ok()) << ValidateSchedule(small);
  absl::StatusOr<Timeline> t = Simulate(small, UniformCosts(2, 1.0, 2.0, 0.0));
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("deadlock"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("stage 0 waits at RB(0)"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("stage 1 waits at RF(0)"), std::string::npos) << t.status();

  Schedule big = OneFOneB(4, 8);
  swap_first(big.per_stage[2], T::kSendForward, T::kRecvBackward);
  EXPECT_FALSE(ValidateSchedule(big).ok());
  t = Simulate(big, UniformCosts(4, 1.0, 2.0, 0.0));
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("deadlock"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("stage 2 waits at RB(0)"), std::string::npos) << t.status();
  std::printf("%s\n", std::string(t.status().message()).c_str());
}

// Receives in another order than the sends: both the validator and the simulator object.
TEST(PipelineSimulator, DetectsOutOfOrderReceives) {
  Schedule s = AllForwardAllBackward(2, 2);
  std::vector<Action>& l = s.per_stage[1];
  ASSERT_EQ(l[0], (Action{T::kRecvForward, 0, 0}));
  ASSERT_EQ(l[2], (Action{T::kRecvForward, 1, 0}));
  std::swap(l[0].microbatch, l[2].microbatch);  // now RF(1) F(0) RF(0) F(1)
  EXPECT_FALSE(ValidateSchedule(s).ok());
  absl::StatusOr<Timeline> t = Simulate(s, UniformCosts(2, 1.0, 2.0, 0.0));
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("out of order"), std::string::npos) << t.status();
}

TEST(PipelineExitPlacement, Invariants) {
  for (const Schedule& s : AllSchedules()) {
    SCOPED_TRACE(Label(s));
    std::vector<bool> exits(s.stages, true);
    exits.back() = s.stages == 1;  // exits on stages 0..p-2 (all of one stage when p == 1)
    const Schedule placed = PlaceExitHeads(s, exits);
    EXPECT_TRUE(ValidateSchedule(placed).ok()) << ValidateSchedule(placed);
    for (int st = 0; st < s.stages; ++st) {
      int count = 0;
      std::vector<Action> without;
      for (const Action& a : placed.per_stage[st]) {
        if (a.type == T::kExitHeads)
          ++count;
        else
          without.push_back(a);
      }
      EXPECT_EQ(without, s.per_stage[st]) << "placement must not reorder other actions";
      EXPECT_EQ(count, exits[st] ? s.microbatches * s.chunks : 0) << "stage " << st;
      if (!exits[st]) continue;
      for (int c = 0; c < s.chunks; ++c) {
        for (int m = 0; m < s.microbatches; ++m) {
          const int e = Find(placed, st, {T::kExitHeads, m, c});
          EXPECT_GT(e, Find(placed, st, {T::kForward, m, c})) << "stage " << st << " mb " << m;
          EXPECT_LT(e, Find(placed, st, {T::kBackward, m, c})) << "stage " << st << " mb " << m;
        }
      }
    }
    absl::StatusOr<Timeline> t = Simulate(placed, UniformCosts(s.stages, 1.0, 2.0, 0.5));
    EXPECT_TRUE(t.ok()) << t.status();
    // Idempotent: placing again gives the same schedule.
    EXPECT_EQ(PlaceExitHeads(placed, exits).per_stage, placed.per_stage);
  }
}

TEST(PipelineExitPlacement, PerVirtualStage) {
  absl::StatusOr<Schedule> s = Interleaved1F1B(2, 4, 2);
  ASSERT_TRUE(s.ok()) << s.status();
  // Virtual stages 0..3 = (stage 0, chunk 0), (1, 0), (0, 1), (1, 1): exits on virtual stage 1.
  const Schedule placed = PlaceExitHeads(*s, {false, true, false, false});
  EXPECT_TRUE(ValidateSchedule(placed).ok()) << ValidateSchedule(placed);
  int on_stage0 = 0, on_stage1_chunk0 = 0, other = 0;
  for (int st = 0; st < 2; ++st) {
    for (const Action& a : placed.per_stage[st]) {
      if (a.type != T::kExitHeads) continue;
      if (st == 0)
        ++on_stage0;
      else if (a.chunk == 0)
        ++on_stage1_chunk0;
      else
        ++other;
    }
  }
  EXPECT_EQ(on_stage0, 0);
  EXPECT_EQ(on_stage1_chunk0, 4);
  EXPECT_EQ(other, 0);
}

// EE-LLM's configs place exits on early stages: exits on stages 0..p-2, exit work e = 0.5 per
// microbatch (f = 1, b = 2). Placing it into the bubbles beats fusing it into the backward.
TEST(PipelineExitPlacement, ShortensPp4M8) {
  const int p = 4, m = 8;
  const Schedule s = OneFOneB(p, m);
  PipelineCosts costs = UniformCosts(p, 1.0, 2.0, 0.5);
  costs.exit[p - 1] = 0.0;
  const std::vector<bool> exits = {true, true, true, false};
  absl::StatusOr<Timeline> fused = Simulate(s, costs);
  absl::StatusOr<Timeline> placed = Simulate(PlaceExitHeads(s, exits), costs);
  ASSERT_TRUE(fused.ok()) << fused.status();
  ASSERT_TRUE(placed.ok()) << placed.status();
  std::printf("pp=4 m=8 f=1 b=2 e=0.5 on stages 0-2 (1F1B)\n");
  std::printf("fused into backward: makespan %g, bubble fraction %.4f (idle / ideal %.4f)\n%s",
              fused->makespan, BubbleFraction(*fused), BubbleOverIdeal(*fused),
              RenderTimeline(*fused, static_cast<int>(2 * fused->makespan)).c_str());
  std::printf("placed in bubbles:   makespan %g, bubble fraction %.4f (idle / ideal %.4f)\n%s",
              placed->makespan, BubbleFraction(*placed), BubbleOverIdeal(*placed),
              RenderTimeline(*placed, static_cast<int>(2 * placed->makespan)).c_str());
  EXPECT_LT(placed->makespan, fused->makespan);
  EXPECT_LT(BubbleFraction(*placed), BubbleFraction(*fused));
  // Same work either way: 8 * (1 + 2 + 0.5) on stages 0..2, 8 * 3 on stage 3.
  for (int st = 0; st < p; ++st) EXPECT_EQ(placed->busy_time[st], fused->busy_time[st]);
  // Never faster than the pipeline without exits (33), never slower than fused.
  EXPECT_GE(placed->makespan, 33.0);

  // Interleaved (v = 2, per-chunk costs): placement helps there too.
  absl::StatusOr<Schedule> inter = Interleaved1F1B(p, m, 2);
  ASSERT_TRUE(inter.ok()) << inter.status();
  absl::StatusOr<Timeline> ifused = Simulate(*inter, costs);
  absl::StatusOr<Timeline> iplaced = Simulate(PlaceExitHeads(*inter, exits), costs);
  ASSERT_TRUE(ifused.ok() && iplaced.ok());
  std::printf("interleaved v=2: makespan fused %g placed %g; bubble fraction %.4f -> %.4f\n",
              ifused->makespan, iplaced->makespan, BubbleFraction(*ifused),
              BubbleFraction(*iplaced));
  EXPECT_LT(iplaced->makespan, ifused->makespan);
}

// The placed schedule is never slower than fusing across a sweep of sizes and exit costs.
TEST(PipelineExitPlacement, NeverSlowerThanFused) {
  for (int p : {2, 4, 8}) {
    for (int m : {1, 2, 4, 8, 16}) {
      for (double e : {0.25, 0.5, 1.0, 2.0, 4.0}) {
        PipelineCosts costs = UniformCosts(p, 1.0, 2.0, e);
        costs.exit[p - 1] = 0.0;
        std::vector<bool> exits(p, true);
        exits.back() = false;
        const Schedule s = OneFOneB(p, m);
        absl::StatusOr<Timeline> fused = Simulate(s, costs);
        absl::StatusOr<Timeline> placed = Simulate(PlaceExitHeads(s, exits), costs);
        ASSERT_TRUE(fused.ok() && placed.ok());
        EXPECT_LE(placed->makespan, fused->makespan) << "p=" << p << " m=" << m << " e=" << e;
      }
    }
  }
}

// Batched exchanges keep each stage's forwards and backwards in order and every channel's
// message order (ValidateSchedule), put a run of messages only between segments (sends of what
// the last computes produced before receives of what the next need), keep exit work right
// before its backward, and cost nothing in the cost model without exits (interleaved: within
// 2.5% with exits).
TEST(PipelineBatchExchanges, SameComputesSameTimeValid) {
  for (const Schedule& s : AllSchedules()) {
    for (bool exits : {false, true}) {
      std::vector<bool> has(s.stages * s.chunks, false);
      for (size_t i = 1; i + 1 < has.size(); i += 2) has[i] = true;
      const Schedule in = exits ? PlaceExitHeads(s, has) : s;
      const Schedule b = BatchExchanges(in);
      const absl::Status valid = ValidateSchedule(b);
      ASSERT_TRUE(valid.ok()) << Label(s) << ": " << valid.message();
      for (int st = 0; st < s.stages; ++st) {
        auto computes = [](const std::vector<Action>& l) {
          std::vector<Action> c;
          for (const Action& a : l)
            if (a.type == T::kForward || a.type == T::kBackward) c.push_back(a);
          return c;
        };
        EXPECT_EQ(computes(b.per_stage[st]), computes(in.per_stage[st])) << Label(s);
        const std::vector<Action>& l = b.per_stage[st];
        for (size_t i = 0; i + 1 < l.size(); ++i) {
          // Within a run, no send follows a receive.
          const bool recv = l[i].type == T::kRecvForward || l[i].type == T::kRecvBackward;
          const bool next_send =
              l[i + 1].type == T::kSendForward || l[i + 1].type == T::kSendBackward;
          EXPECT_FALSE(recv && next_send) << Label(s) << " stage " << st << " at " << i;
          if (l[i].type == T::kExitHeads) {
            EXPECT_EQ(l[i + 1], (Action{T::kBackward, l[i].microbatch, l[i].chunk})) << Label(s);
          }
        }
      }
      const PipelineCosts costs = UniformCosts(s.stages, 1.0, 2.0, exits ? 0.5 : 0.0);
      absl::StatusOr<Timeline> plain = Simulate(in, costs), batched = Simulate(b, costs);
      ASSERT_TRUE(plain.ok() && batched.ok()) << Label(s);
      if (!exits && s.chunks > 1) {
        EXPECT_DOUBLE_EQ(batched->makespan, plain->makespan) << Label(s);
      }
      if (exits && s.chunks > 1) {
        EXPECT_LE(batched->makespan, 1.025 * plain->makespan) << Label(s);
      }
    }
  }
}

}  // namespace
}  // namespace eellm
