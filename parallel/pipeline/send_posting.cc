// When held messages are posted, and the rendezvous check (see send_posting.h).
#include "parallel/pipeline/send_posting.h"

#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"

namespace eellm {
namespace {

// One message operation of a stage: which message (direction, microbatch, sender's virtual
// stage), the peer stage, whether this side sends it, and its place among this stage's sends to
// (or receives from) that peer: NCCL has no tags and pairs a pair of ranks' messages in order.
struct Op {
  bool send = false;
  std::tuple<bool, int, int> message;  // (gradient, microbatch, sender virtual stage)
  int peer = 0;
  std::string name;  // the action, for errors
  int seq = 0;
  bool done = false;
};

Op MakeOp(const Action& a, int stage, int stages) {
  const int v = a.chunk * stages + stage;
  const int next = (stage + 1) % stages, prev = (stage + stages - 1) % stages;
  const std::string name = ActionString(a);
  switch (a.type) {
    case ActionType::kSendForward:
      return {true, {false, a.microbatch, v}, next, name};
    case ActionType::kRecvForward:
      return {false, {false, a.microbatch, v - 1}, prev, name};
    case ActionType::kSendBackward:
      return {true, {true, a.microbatch, v}, prev, name};
    default:  // kRecvBackward
      return {false, {true, a.microbatch, v + 1}, next, name};
  }
}

struct StageState {
  size_t pos = 0;
  std::map<std::pair<int, bool>, int> posted;  // (peer, send) -> operations so far
  std::vector<Op> held;                        // operations not posted yet
  std::vector<Op> active;                      // the group posted and waited for (empty: none)
  bool finished = false;
};

}  // namespace

bool PostAfter(const std::vector<Action>& actions, size_t i, int stages) {
  if (stages <= 1 || !IsMessage(actions[i].type)) return false;
  if (i + 1 < actions.size() && IsMessage(actions[i + 1].type)) return false;  // same run
  // The run ends at i: with a receive in it, it is posted now.
  for (size_t j = i + 1; j-- > 0 && IsMessage(actions[j].type);) {
    if (IsRecv(actions[j].type)) return true;
  }
  // Sends alone: they leave now unless the next message is a receive.
  for (size_t j = i + 1; j < actions.size(); ++j) {
    if (IsRecv(actions[j].type)) return false;
    if (IsSend(actions[j].type)) return true;
  }
  return true;
}

absl::Status CheckRendezvous(const Schedule& s, const PostRule& rule) {
  const int stages = s.stages;
  if (stages <= 1) return absl::OkStatus();  // every message stays on the rank
  std::vector<StageState> st(stages);
  while (true) {
    bool progress = false, all_finished = true;
    // Each stage without a group in flight runs on to its next group.
    for (int r = 0; r < stages; ++r) {
      StageState& x = st[r];
      const std::vector<Action>& actions = s.per_stage[r];
      while (!x.finished && x.active.empty()) {
        if (x.pos == actions.size()) {
          if (x.held.empty()) {
            x.finished = true;
          } else {
            x.active.swap(x.held);  // what is still held is posted at the end
          }
          progress = true;
          break;
        }
        const size_t i = x.pos++;
        progress = true;
        const Action& a = actions[i];
        if (!IsMessage(a.type)) continue;
        Op op = MakeOp(a, r, stages);
        op.seq = x.posted[{op.peer, op.send}]++;
        x.held.push_back(std::move(op));
        if (rule(actions, i, stages)) x.active.swap(x.held);
      }
      all_finished = all_finished && x.finished;
    }
    if (all_finished) return absl::OkStatus();
    // Operations whose counterparts (the same place in the other rank's order) are in the peers'
    // groups complete; a pair that would carry different messages is an error.
    for (int r = 0; r < stages; ++r) {
      for (Op& op : st[r].active) {
        if (op.done) continue;
        for (Op& other : st[op.peer].active) {
          if (other.done || other.peer != r || other.send == op.send || other.seq != op.seq) {
            continue;
          }
          if (other.message != op.message) {
            return absl::FailedPreconditionError(absl::StrCat(
                s.name, ": stage ", r, "'s ", op.name, " would pair with stage ", op.peer, "'s ",
                other.name, " (messages between two ranks pair in order)"));
          }
          op.done = other.done = true;
          progress = true;
          break;
        }
      }
    }
    for (StageState& x : st) {
      bool complete = !x.active.empty();
      for (const Op& op : x.active) complete = complete && op.done;
      if (complete) {
        x.active.clear();
        progress = true;
      }
    }
    if (!progress) {
      std::string stuck;
      for (int r = 0; r < stages; ++r) {
        if (st[r].finished) continue;
        absl::StrAppend(&stuck, "; stage ", r, " waits in {");
        for (const Op& op : st[r].active) absl::StrAppend(&stuck, " ", op.name);
        absl::StrAppend(&stuck, " }");
      }
      return absl::FailedPreconditionError(
          absl::StrCat(s.name, " with ", stages, " stages and ", s.microbatches,
                       " microbatches deadlocks under rendezvous sends", stuck));
    }
  }
}

}  // namespace eellm
