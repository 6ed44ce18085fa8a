// Tests of when held pipeline messages are posted (PostAfter) and of the rendezvous check that
// shows the executor's schedules cannot deadlock NCCL under that rule.
#include "parallel/pipeline/send_posting.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/pipeline/schedule.h"

namespace eellm {
namespace {

Action A(ActionType t, int m, int c = 0) { return {t, m, c}; }

// The communicator's grouping alone: every send held to the stage's next receive.
bool PostAtReceivesOnly(const std::vector<Action>& a, size_t i, int) { return IsRecv(a[i].type); }

TEST(SendPosting, PostsRunsWithAReceiveAndSendsWhenTheNextMessageIsASendOrNone) {
  using T = ActionType;
  // Stage 0 of 1F1B with 3 stages: two warm-up forwards, then one forward and backward.
  const std::vector<Action> first = {
      A(T::kForward, 0), A(T::kSendForward, 0), A(T::kForward, 1),      A(T::kSendForward, 1),
      A(T::kForward, 2), A(T::kSendForward, 2), A(T::kRecvBackward, 0), A(T::kBackward, 0)};
  EXPECT_TRUE(PostAfter(first, 1, 3));  // the next message is a send
  EXPECT_TRUE(PostAfter(first, 3, 3));
  EXPECT_FALSE(PostAfter(first, 5, 3));  // grouped with RecvBackward(0)...
  EXPECT_TRUE(PostAfter(first, 6, 3));   // ...and posted with it
  EXPECT_FALSE(PostAfter(first, 7, 3));  // not a message
  // The last send of a list leaves at once; on one stage nothing leaves the rank.
  const std::vector<Action> last = {A(T::kBackward, 0), A(T::kSendBackward, 0)};
  EXPECT_TRUE(PostAfter(last, 1, 2));
  EXPECT_FALSE(PostAfter(last, 1, 1));
  // A batched exchange is posted once, after its last message.
  const std::vector<Action> exchange = {
      A(T::kForward, 3),     A(T::kBackward, 1),     A(T::kSendForward, 3), A(T::kSendBackward, 1),
      A(T::kRecvForward, 4), A(T::kRecvBackward, 2), A(T::kForward, 4)};
  for (size_t i = 2; i < 5; ++i) EXPECT_FALSE(PostAfter(exchange, i, 2)) << i;
  EXPECT_TRUE(PostAfter(exchange, 5, 2));
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
        at_once += PostAfter(actions, i, 4);
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
      // Batched exchanges fit here too (the executor batches only interleaved schedules).
      const absl::Status batched = CheckRendezvous(BatchExchanges(OneFOneB(stages, micro)));
      EXPECT_TRUE(batched.ok()) << batched.message();
    }
  }
  EXPECT_EQ(checked, 7 * 16 * 6);
}

// Interleaved 1F1B as built fits NCCL with as many microbatches as stages, and deadlocks with
// more (also with every send held to the next receive); with its messages in batched exchanges
// (BatchExchanges, the executor's order on NCCL) it always fits. Exit heads in the bubbles change
// nothing (they send nothing).
TEST(SendPosting, InterleavedFitsWithBatchedExchanges) {
  int batched_checked = 0;
  for (int stages = 2; stages <= 8; ++stages) {
    for (int chunks = 2; chunks <= 4; ++chunks) {
      for (int micro = stages; micro <= 4 * stages; micro += stages) {
        absl::StatusOr<Schedule> s = Interleaved1F1B(stages, micro, chunks);
        ASSERT_TRUE(s.ok()) << s.status();
        std::vector<bool> exits(static_cast<size_t>(stages) * chunks, false);
        exits[1] = true;
        const bool fits = micro == stages;
        ASSERT_TRUE(ValidateSchedule(*s).ok());
        for (const Schedule& t : {*s, PlaceExitHeads(*s, exits)}) {
          EXPECT_EQ(CheckRendezvous(t).ok(), fits) << stages << " stages, " << micro;
          EXPECT_EQ(CheckRendezvous(t, PostAtReceivesOnly).ok(), fits)
              << stages << " stages, " << micro;
          const Schedule b = BatchExchanges(t);
          const absl::Status valid = ValidateSchedule(b);
          EXPECT_TRUE(valid.ok()) << valid.message();
          const absl::Status st = CheckRendezvous(b);
          EXPECT_TRUE(st.ok()) << st.message();
          ++batched_checked;
        }
        // Evaluation's forwards alone always fit, batched (as the executor runs them) or not.
        EXPECT_TRUE(CheckRendezvous(ForwardOnly(*s)).ok()) << stages << " stages, " << micro;
        EXPECT_TRUE(CheckRendezvous(ForwardOnly(BatchExchanges(*s))).ok())
            << stages << " stages, " << micro;
      }
    }
  }
  EXPECT_EQ(batched_checked, 7 * 3 * 4 * 2);
}

// The check can fail: every send started at once (no grouping) deadlocks 1F1B's steady state,
// where neighbours send to each other before receiving; every send held to the next receive
// passes (the communicator's grouping alone).
TEST(SendPosting, UngroupedSendsDeadlockTheSteadyState) {
  const Schedule s = OneFOneB(4, 8);
  const PostRule every = [](const std::vector<Action>&, size_t, int) { return true; };
  const absl::Status st = CheckRendezvous(s, every);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("deadlocks"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("stage 1 waits in"), std::string::npos) << st.message();
  EXPECT_TRUE(CheckRendezvous(s, PostAtReceivesOnly).ok());
  // Messages between two ranks pair in order (NCCL has no tags): receiving them in another
  // order than they were sent is named.
  Schedule swapped;
  swapped.stages = 2;
  swapped.name = "swapped";
  using T = ActionType;
  swapped.per_stage = {
      {A(T::kForward, 0), A(T::kSendForward, 0), A(T::kForward, 1), A(T::kSendForward, 1)},
      {A(T::kRecvForward, 1), A(T::kForward, 1), A(T::kRecvForward, 0), A(T::kForward, 0)}};
  const absl::Status order = CheckRendezvous(swapped, PostAtReceivesOnly);
  EXPECT_FALSE(order.ok());
  EXPECT_NE(order.message().find("pair in order"), std::string::npos) << order.message();
}

}  // namespace
}  // namespace eellm
