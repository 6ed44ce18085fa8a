// Tests of when pipeline sends leave (StartSendAtOnce) and of the rendezvous check that shows
// the executor's schedules cannot deadlock NCCL under that rule.
#include "parallel/pipeline/send_posting.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/pipeline/schedule.h"

namespace eellm {
namespace {

Action A(ActionType t, int m, int c = 0) { return {t, m, c}; }

TEST(SendPosting, StartsWhenTheNextMessageIsASendOrNone) {
  using T = ActionType;
  // Stage 0 of 1F1B with 3 stages: two warm-up forwards, then one forward and backward.
  const std::vector<Action> first = {
      A(T::kForward, 0), A(T::kSendForward, 0), A(T::kForward, 1),      A(T::kSendForward, 1),
      A(T::kForward, 2), A(T::kSendForward, 2), A(T::kRecvBackward, 0), A(T::kBackward, 0)};
  EXPECT_TRUE(StartSendAtOnce(first, 1, 3));  // the next message is a send
  EXPECT_TRUE(StartSendAtOnce(first, 3, 3));
  EXPECT_FALSE(StartSendAtOnce(first, 5, 3));  // grouped with RecvBackward(0)
  // The last send of a list leaves at once; on one stage nothing leaves the rank.
  const std::vector<Action> last = {A(T::kBackward, 0), A(T::kSendBackward, 0)};
  EXPECT_TRUE(StartSendAtOnce(last, 1, 2));
  EXPECT_FALSE(StartSendAtOnce(last, 1, 1));
}

TEST(SendPosting, FirstStageWarmupSendsLeaveOneByOne) {
  // Under 1F1B only the first stage's warm-up sends (and the last sends of a list) start at
  // once; every other send waits for the receive that follows it.
  const Schedule s = OneFOneB(4, 8);
  for (int stage = 0; stage < 4; ++stage) {
    const std::vector<Action>& actions = s.per_stage[stage];
    int at_once = 0;
    for (size_t i = 0; i < actions.size(); ++i) {
      if (actions[i].type == ActionType::kSendForward ||
          actions[i].type == ActionType::kSendBackward) {
        at_once += StartSendAtOnce(actions, i, 4);
      }
    }
    // Stage 0: its 3 warm-up SendForwards; the others: their last SendBackward.
    EXPECT_EQ(at_once, stage == 0 ? 3 : 1) << "stage " << stage << ": " << ScheduleString(s);
  }
}

// The forwards alone, as PipelineExecutor::Evaluate runs them.
Schedule ForwardOnly(Schedule s) {
  for (auto& actions : s.per_stage) {
    std::vector<Action> kept;
    for (const Action& a : actions) {
      if (a.type == ActionType::kRecvForward || a.type == ActionType::kForward ||
          a.type == ActionType::kSendForward) {
        kept.push_back(a);
      }
    }
    actions = kept;
  }
  return s;
}

// 1F1B and all-forward-all-backward never deadlock, with and without exit heads in the bubbles,
// nor do the forward-only schedules of evaluation.
TEST(SendPosting, OneFOneBAndAfabNeverDeadlock) {
  int checked = 0;
  for (int stages = 2; stages <= 8; ++stages) {
    for (int micro = 1; micro <= 16; ++micro) {
      for (const Schedule& s : {AllForwardAllBackward(stages, micro), OneFOneB(stages, micro)}) {
        std::vector<bool> exits(stages, false);
        exits[0] = exits[stages / 2] = true;
        for (const Schedule& t : {s, PlaceExitHeads(s, exits), ForwardOnly(s)}) {
          const absl::Status st = CheckRendezvous(t);
          EXPECT_TRUE(st.ok()) << st.message();
          ++checked;
        }
      }
      EXPECT_TRUE(PipelineFitsRendezvous(stages, micro, 1));
    }
  }
  EXPECT_EQ(checked, 7 * 16 * 6);
}

// Interleaved 1F1B fits NCCL with as many microbatches as stages, and deadlocks with more
// (whatever sends are grouped with: every send held to the next receive too), so such runs keep
// their pipeline group on MPI. Exit heads in the bubbles change nothing (they send nothing).
TEST(SendPosting, InterleavedFitsOnlyWithAsManyMicrobatchesAsStages) {
  const SendRule never = [](const std::vector<Action>&, size_t, int) { return false; };
  for (int stages = 2; stages <= 8; ++stages) {
    for (int chunks = 2; chunks <= 3; ++chunks) {
      for (int micro = stages; micro <= 4 * stages; micro += stages) {
        absl::StatusOr<Schedule> s = Interleaved1F1B(stages, micro, chunks);
        ASSERT_TRUE(s.ok()) << s.status();
        std::vector<bool> exits(static_cast<size_t>(stages) * chunks, false);
        exits[1] = true;
        const bool fits = micro == stages;
        ASSERT_TRUE(ValidateSchedule(*s).ok());
        for (const Schedule& t : {*s, PlaceExitHeads(*s, exits)}) {
          EXPECT_EQ(CheckRendezvous(t).ok(), fits) << stages << " stages, " << micro;
          EXPECT_EQ(CheckRendezvous(t, never).ok(), fits) << stages << " stages, " << micro;
        }
        // Evaluation's forwards alone always fit.
        EXPECT_TRUE(CheckRendezvous(ForwardOnly(*s)).ok()) << stages << " stages, " << micro;
        EXPECT_EQ(PipelineFitsRendezvous(stages, micro, chunks), fits);
      }
    }
  }
}

// The check can fail: every send started at once (no grouping) deadlocks 1F1B's steady state,
// where neighbours send to each other before receiving; every send held to the next receive
// passes (the communicator's grouping alone).
TEST(SendPosting, UngroupedSendsDeadlockTheSteadyState) {
  const Schedule s = OneFOneB(4, 8);
  const SendRule every = [](const std::vector<Action>&, size_t, int) { return true; };
  const absl::Status st = CheckRendezvous(s, every);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("deadlocks"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("stage 1 waits in"), std::string::npos) << st.message();
  const SendRule never = [](const std::vector<Action>&, size_t, int) { return false; };
  EXPECT_TRUE(CheckRendezvous(s, never).ok());
  // Messages between two ranks pair in order (NCCL has no tags): receiving them in another
  // order than they were sent is named.
  Schedule swapped;
  swapped.stages = 2;
  swapped.name = "swapped";
  using T = ActionType;
  swapped.per_stage = {
      {A(T::kForward, 0), A(T::kSendForward, 0), A(T::kForward, 1), A(T::kSendForward, 1)},
      {A(T::kRecvForward, 1), A(T::kForward, 1), A(T::kRecvForward, 0), A(T::kForward, 0)}};
  const absl::Status order = CheckRendezvous(swapped, never);
  EXPECT_FALSE(order.ok());
  EXPECT_NE(order.message().find("pair in order"), std::string::npos) << order.message();
}

}  // namespace
}  // namespace eellm
