// Cost-model execution of pipeline schedules (see simulator.h): a Kahn process network of stages
// connected by FIFO channels, so the result does not depend on the order stages are advanced in.
#include "parallel/pipeline/simulator.h"

#include <algorithm>
#include <deque>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace eellm {
namespace {

struct Message {
  int microbatch;
  int to_virtual_stage;
  double arrival;
};

// (from stage, to stage, 0 = activations / 1 = gradients).
using Channel = std::tuple<int, int, int>;

std::string ChannelString(const Channel& c) {
  return absl::StrCat("stage ", std::get<0>(c), " -> stage ", std::get<1>(c),
                      std::get<2>(c) ? " gradients" : " activations");
}

}  // namespace

PipelineCosts UniformCosts(int stages, double forward, double backward, double exit) {
  PipelineCosts c;
  c.forward.assign(stages, forward);
  c.backward.assign(stages, backward);
  c.exit.assign(stages, exit);
  return c;
}

absl::StatusOr<Timeline> Simulate(const Schedule& s, const PipelineCosts& costs) {
  const int p = s.stages, last_virtual = s.stages * s.chunks - 1;
  if (p < 1 || static_cast<int>(s.per_stage.size()) != p) {
    return absl::InvalidArgumentError(absl::StrCat(
        "schedule '", s.name, "' has ", s.per_stage.size(), " lists for ", p, " stages"));
  }
  for (const auto* v : {&costs.forward, &costs.backward, &costs.exit}) {
    if (static_cast<int>(v->size()) != p) {
      return absl::InvalidArgumentError(absl::StrCat("pipeline costs have ", v->size(),
                                                     " entries; want one per stage (", p, ")"));
    }
    for (double x : *v)
      if (!(x >= 0.0)) return absl::InvalidArgumentError(absl::StrCat("negative cost ", x));
  }
  if (!(costs.p2p_latency >= 0.0))
    return absl::InvalidArgumentError(absl::StrCat("negative p2p latency ", costs.p2p_latency));

  // Exit work is fused into the backward on stages whose list has no ExitHeads action.
  std::vector<bool> exits_placed(p, false);
  for (int st = 0; st < p; ++st)
    for (const Action& a : s.per_stage[st])
      if (a.type == ActionType::kExitHeads) exits_placed[st] = true;

  Timeline t;
  t.stages = p;
  t.busy.resize(p);
  std::vector<size_t> pc(p, 0);
  std::vector<double> clock(p, 0.0);
  std::map<Channel, std::deque<Message>> channels;
  bool progress = true;
  while (progress) {
    progress = false;
    for (int st = 0; st < p; ++st) {
      const std::vector<Action>& list = s.per_stage[st];
      while (pc[st] < list.size()) {
        const Action& a = list[pc[st]];
        const int vs = a.chunk * p + st;
        auto where = [&] {
          return absl::StrCat("stage ", st, " action ", pc[st], " ", ActionString(a));
        };
        if (a.chunk < 0 || a.chunk >= s.chunks)
          return absl::InvalidArgumentError(where() + ": chunk out of range");
        double cost = -1.0;  // compute actions only
        bool blocked = false;
        switch (a.type) {
          case ActionType::kForward:
            cost = costs.forward[st];
            break;
          case ActionType::kBackward:
            cost = costs.backward[st] + (exits_placed[st] ? 0.0 : costs.exit[st]);
            break;
          case ActionType::kExitHeads:
            cost = costs.exit[st];
            break;
          case ActionType::kSendForward:
          case ActionType::kSendBackward: {
            const bool fwd = a.type == ActionType::kSendForward;
            const int to = fwd ? vs + 1 : vs - 1;
            if (to < 0 || to > last_virtual)
              return absl::InvalidArgumentError(where() + ": no virtual stage to send to");
            channels[{st, to % p, fwd ? 0 : 1}].push_back(
                {a.microbatch, to, clock[st] + costs.p2p_latency});
            break;
          }
          case ActionType::kRecvForward:
          case ActionType::kRecvBackward: {
            const bool fwd = a.type == ActionType::kRecvForward;
            const int from = fwd ? vs - 1 : vs + 1;
            if (from < 0 || from > last_virtual)
              return absl::InvalidArgumentError(where() + ": no virtual stage to receive from");
            const Channel ch{from % p, st, fwd ? 0 : 1};
            std::deque<Message>& q = channels[ch];
            if (q.empty()) {
              blocked = true;  // pc stays; retried when another stage has made progress
              break;
            }
            const Message msg = q.front();
            if (msg.microbatch != a.microbatch || msg.to_virtual_stage != vs) {
              return absl::FailedPreconditionError(
                  absl::StrCat(where(), ": next message on ", ChannelString(ch),
                               " is for microbatch ", msg.microbatch, " virtual stage ",
                               msg.to_virtual_stage, " (sends and receives out of order)"));
            }
            q.pop_front();
            clock[st] = std::max(clock[st], msg.arrival);
            break;
          }
        }
        if (blocked) break;
        if (cost >= 0.0) {
          t.busy[st].push_back({clock[st], clock[st] + cost, a});
          clock[st] += cost;
        }
        ++pc[st];
        progress = true;
      }
    }
  }

  std::string stuck;
  for (int st = 0; st < p; ++st) {
    if (pc[st] < s.per_stage[st].size()) {
      const Action& a = s.per_stage[st][pc[st]];
      const int vs = a.chunk * p + st;
      const int from = a.type == ActionType::kRecvForward ? vs - 1 : vs + 1;
      absl::StrAppend(&stuck, stuck.empty() ? "" : "; ", "stage ", st, " waits at ",
                      ActionString(a), " (action ", pc[st], ") for stage ", from % p);
    }
  }
  if (!stuck.empty())
    return absl::FailedPreconditionError(
        absl::StrCat("schedule '", s.name, "' deadlocks: ", stuck));
  for (const auto& [ch, q] : channels) {
    if (!q.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("schedule '", s.name, "': ", q.size(), " message(s) on ", ChannelString(ch),
                       " never received (first: microbatch ", q.front().microbatch, ")"));
    }
  }

  t.busy_time.assign(p, 0.0);
  for (int st = 0; st < p; ++st) {
    for (const BusyInterval& b : t.busy[st]) {
      t.busy_time[st] += b.end - b.start;
      t.makespan = std::max(t.makespan, b.end);
    }
  }
  t.idle_time.resize(p);
  for (int st = 0; st < p; ++st) t.idle_time[st] = t.makespan - t.busy_time[st];
  return t;
}

double BubbleFraction(const Timeline& t) {
  if (t.stages == 0 || t.makespan <= 0.0) return 0.0;
  double idle = 0.0;
  for (double x : t.idle_time) idle += x;
  return idle / (t.stages * t.makespan);
}

double BubbleOverIdeal(const Timeline& t) {
  double idle = 0.0, busy = 0.0;
  for (int st = 0; st < t.stages; ++st) {
    idle += t.idle_time[st];
    busy += t.busy_time[st];
  }
  return busy > 0.0 ? idle / busy : 0.0;
}

std::string RenderTimeline(const Timeline& t, int width) {
  std::string out;
  if (width < 1) return out;
  const int label = static_cast<int>(absl::StrCat(t.stages - 1).size());
  for (int st = 0; st < t.stages; ++st) {
    std::string id = absl::StrCat(st);
    std::string row = absl::StrCat("stage ", std::string(label - id.size(), ' '), id, " |");
    size_t k = 0;  // first interval that may cover the current time
    const std::vector<BusyInterval>& busy = t.busy[st];
    for (int i = 0; i < width; ++i) {
      const double time = (i + 0.5) * t.makespan / width;
      while (k < busy.size() && busy[k].end <= time) ++k;
      char c = '.';
      if (k < busy.size() && busy[k].start <= time) {
        const ActionType type = busy[k].action.type;
        c = type == ActionType::kForward ? 'F' : type == ActionType::kBackward ? 'B' : 'E';
      }
      row.push_back(c);
    }
    absl::StrAppend(&out, row, "|\n");
  }
  return out;
}

}  // namespace eellm
