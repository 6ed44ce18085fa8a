// Pipeline schedule builders (AFAB, 1F1B, interleaved 1F1B), exit-head placement and the
// structural validator. See schedule.h for the conventions.
#include "parallel/pipeline/schedule.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace eellm {
namespace {

// A unit of pipeline work on one stage: model chunk `chunk` on microbatch `mb`.
struct Item {
  int mb;
  int chunk;
};

// One stage's action list: `warmup` forwards, then one forward and one backward at a time, then
// the remaining backwards; each compute wrapped in the receive before and the send after it.
std::vector<Action> BuildStage(int stages, int chunks, int stage, const std::vector<Item>& fwd,
                               const std::vector<Item>& bwd, int warmup) {
  const int last_virtual = stages * chunks - 1;
  std::vector<Action> out;
  auto forward = [&](const Item& it) {
    const int v = it.chunk * stages + stage;
    if (v > 0) out.push_back({ActionType::kRecvForward, it.mb, it.chunk});
    out.push_back({ActionType::kForward, it.mb, it.chunk});
    if (v < last_virtual) out.push_back({ActionType::kSendForward, it.mb, it.chunk});
  };
  auto backward = [&](const Item& it) {
    const int v = it.chunk * stages + stage;
    if (v < last_virtual) out.push_back({ActionType::kRecvBackward, it.mb, it.chunk});
    out.push_back({ActionType::kBackward, it.mb, it.chunk});
    if (v > 0) out.push_back({ActionType::kSendBackward, it.mb, it.chunk});
  };
  const int n = static_cast<int>(fwd.size());
  for (int k = 0; k < warmup; ++k) forward(fwd[k]);
  for (int k = 0; k < n - warmup; ++k) {
    forward(fwd[k + warmup]);
    backward(bwd[k]);
  }
  for (int k = n - warmup; k < n; ++k) backward(bwd[k]);
  return out;
}

std::vector<Item> Sequential(int microbatches) {
  std::vector<Item> items;
  for (int m = 0; m < microbatches; ++m) items.push_back({m, 0});
  return items;
}

void CheckSizes(int stages, int microbatches) {
  EE_CHECK(stages >= 1 && microbatches >= 1, "pipeline schedule needs stages >= 1 (got ", stages,
           ") and microbatches >= 1 (got ", microbatches, ")");
}

}  // namespace

bool IsCompute(ActionType t) {
  return t == ActionType::kForward || t == ActionType::kBackward || t == ActionType::kExitHeads;
}
bool IsSend(ActionType t) {
  return t == ActionType::kSendForward || t == ActionType::kSendBackward;
}
bool IsRecv(ActionType t) {
  return t == ActionType::kRecvForward || t == ActionType::kRecvBackward;
}
bool IsMessage(ActionType t) { return IsSend(t) || IsRecv(t); }

const char* ActionTypeName(ActionType t) {
  switch (t) {
    case ActionType::kRecvForward:
      return "RF";
    case ActionType::kForward:
      return "F";
    case ActionType::kSendForward:
      return "SF";
    case ActionType::kRecvBackward:
      return "RB";
    case ActionType::kBackward:
      return "B";
    case ActionType::kSendBackward:
      return "SB";
    case ActionType::kExitHeads:
      return "E";
  }
  return "?";
}

std::string ActionString(const Action& a) {
  if (a.chunk == 0) return absl::StrCat(ActionTypeName(a.type), "(", a.microbatch, ")");
  return absl::StrCat(ActionTypeName(a.type), "(", a.microbatch, ",c", a.chunk, ")");
}

std::string ScheduleString(const Schedule& s) {
  std::string out = absl::StrCat(s.name, " stages=", s.stages, " microbatches=", s.microbatches,
                                 " chunks=", s.chunks, "\n");
  for (int st = 0; st < static_cast<int>(s.per_stage.size()); ++st) {
    absl::StrAppend(&out, "stage ", st, ":");
    for (const Action& a : s.per_stage[st]) absl::StrAppend(&out, " ", ActionString(a));
    absl::StrAppend(&out, "\n");
  }
  return out;
}

Schedule AllForwardAllBackward(int stages, int microbatches) {
  CheckSizes(stages, microbatches);
  Schedule s{stages, microbatches, 1, {}, "AFAB"};
  const std::vector<Item> order = Sequential(microbatches);
  for (int st = 0; st < stages; ++st)
    s.per_stage.push_back(BuildStage(stages, 1, st, order, order, microbatches));
  return s;
}

Schedule OneFOneB(int stages, int microbatches) {
  CheckSizes(stages, microbatches);
  Schedule s{stages, microbatches, 1, {}, "1F1B"};
  const std::vector<Item> order = Sequential(microbatches);
  for (int st = 0; st < stages; ++st) {
    const int warmup = std::min(stages - st - 1, microbatches);
    s.per_stage.push_back(BuildStage(stages, 1, st, order, order, warmup));
  }
  return s;
}

absl::StatusOr<Schedule> Interleaved1F1B(int stages, int microbatches, int chunks) {
  if (stages < 1 || microbatches < 1 || chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "interleaved 1F1B needs stages, microbatches and chunks >= 1; got stages=", stages,
        " microbatches=", microbatches, " chunks=", chunks));
  }
  if (chunks == 1) return OneFOneB(stages, microbatches);
  if (microbatches % stages != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("interleaved 1F1B needs the number of microbatches (", microbatches,
                     ") to be a multiple of the number of pipeline stages (", stages, ")"));
  }
  // Megatron's get_model_chunk_id / microbatch id: work item k belongs to group k / (p * v);
  // within a group, chunk (k % (p * v)) / p of microbatch group * p + k % p; backwards use the
  // chunks in reverse.
  const int total = microbatches * chunks;
  std::vector<Item> fwd, bwd;
  for (int k = 0; k < total; ++k) {
    const int group = k / (stages * chunks), in_group = k % (stages * chunks);
    const int mb = group * stages + in_group % stages, chunk = in_group / stages;
    fwd.push_back({mb, chunk});
    bwd.push_back({mb, chunks - 1 - chunk});
  }
  Schedule s{stages, microbatches, chunks, {}, "interleaved-1F1B"};
  for (int st = 0; st < stages; ++st) {
    // As in Megatron: with microbatches == stages every stage runs all forwards first.
    const int warmup = microbatches == stages
                           ? total
                           : std::min(2 * (stages - st - 1) + (chunks - 1) * stages, total);
    s.per_stage.push_back(BuildStage(stages, chunks, st, fwd, bwd, warmup));
  }
  return s;
}

Schedule BatchExchanges(const Schedule& s) {
  Schedule out = s;
  out.name = s.name + "-batched";
  for (int st = 0; st < s.stages; ++st) {
    // Exit-head work moves to right before its microbatch's backward.
    std::vector<Action> list;
    for (const Action& a : s.per_stage[st]) {
      if (a.type == ActionType::kBackward) {
        const Action exit{ActionType::kExitHeads, a.microbatch, a.chunk};
        if (std::find(s.per_stage[st].begin(), s.per_stage[st].end(), exit) !=
            s.per_stage[st].end()) {
          list.push_back(exit);
        }
      }
      if (a.type != ActionType::kExitHeads) list.push_back(a);
    }
    // Segments of computes: a segment ends after a Backward, and after a Forward whose next
    // Forward or Backward is a Forward (warm-up) or when there is no steady state (no Forward
    // after the first Backward: the last forward of an all-forwards-first list stays alone).
    bool steady = false, seen_backward = false;
    for (const Action& a : list) {
      seen_backward = seen_backward || a.type == ActionType::kBackward;
      steady = steady || (seen_backward && a.type == ActionType::kForward);
    }
    std::vector<std::vector<size_t>> segments(1);
    for (size_t i = 0; i < list.size(); ++i) {
      if (!IsCompute(list[i].type)) continue;
      segments.back().push_back(i);
      bool end = list[i].type == ActionType::kBackward;
      if (list[i].type == ActionType::kForward) {
        end = true;
        for (size_t j = i + 1; j < list.size(); ++j) {
          if (list[j].type == ActionType::kBackward) end = !steady;
          if (list[j].type == ActionType::kForward || list[j].type == ActionType::kBackward) {
            break;
          }
        }
      }
      if (end) segments.emplace_back();
    }
    // Each message belongs to its compute: a receive to the compute after it, a send to the one
    // before it.
    std::map<size_t, std::vector<Action>> recv_of, send_of;
    size_t last_compute = 0;
    std::vector<Action> pending_recv;
    for (size_t i = 0; i < list.size(); ++i) {
      const ActionType t = list[i].type;
      if (IsCompute(t)) {
        recv_of[i] = std::move(pending_recv);
        pending_recv.clear();
        last_compute = i;
      } else if (IsRecv(t)) {
        pending_recv.push_back(list[i]);
      } else {
        send_of[last_compute].push_back(list[i]);
      }
    }
    std::vector<Action> result;
    auto receives_of = [&](const std::vector<size_t>& seg) {
      for (ActionType t : {ActionType::kRecvForward, ActionType::kRecvBackward}) {
        for (size_t i : seg) {
          for (const Action& a : recv_of[i])
            if (a.type == t) result.push_back(a);
        }
      }
    };
    if (!segments.empty()) receives_of(segments[0]);
    for (size_t k = 0; k < segments.size(); ++k) {
      for (size_t i : segments[k]) result.push_back(list[i]);
      for (ActionType t : {ActionType::kSendForward, ActionType::kSendBackward}) {
        for (size_t i : segments[k]) {
          for (const Action& a : send_of[i])
            if (a.type == t) result.push_back(a);
        }
      }
      if (k + 1 < segments.size()) receives_of(segments[k + 1]);
    }
    EE_CHECK(result.size() == list.size(), "BatchExchanges lost actions on stage ", st);
    out.per_stage[st] = std::move(result);
  }
  return out;
}

Schedule PlaceExitHeads(const Schedule& s, const std::vector<bool>& has_exits) {
  const int virtual_stages = s.stages * s.chunks;
  EE_CHECK(static_cast<int>(has_exits.size()) == s.stages ||
               static_cast<int>(has_exits.size()) == virtual_stages,
           "has_exits has ", has_exits.size(), " entries; want stages (", s.stages,
           ") or stages * chunks (", virtual_stages, ")");
  Schedule out = s;
  for (int st = 0; st < s.stages; ++st) {
    auto exits_on = [&](int chunk) {
      return has_exits.size() == static_cast<size_t>(s.stages) ? has_exits[st]
                                                               : has_exits[chunk * s.stages + st];
    };
    std::vector<Action> list;
    for (const Action& a : s.per_stage[st])
      if (a.type != ActionType::kExitHeads) list.push_back(a);

    std::set<std::pair<int, int>> forwarded, placed;
    std::vector<Action> pending_warmup;  // exits of forwards before the first backward
    bool seen_backward = false;
    std::vector<Action> result;
    auto place = [&](int mb, int chunk) {
      if (exits_on(chunk) && forwarded.count({mb, chunk}) && placed.insert({mb, chunk}).second)
        result.push_back({ActionType::kExitHeads, mb, chunk});
    };
    for (const Action& a : list) {
      const bool backward_side =
          a.type == ActionType::kRecvBackward || a.type == ActionType::kBackward;
      if (backward_side && !seen_backward) {
        // The stage waits here for the first gradient: fill that bubble with the exit work of
        // every microbatch forwarded so far.
        seen_backward = true;
        for (const Action& e : pending_warmup) place(e.microbatch, e.chunk);
      }
      if (backward_side) place(a.microbatch, a.chunk);
      EE_CHECK(a.type != ActionType::kBackward || !exits_on(a.chunk) ||
                   placed.count({a.microbatch, a.chunk}),
               "Backward before Forward in stage ", st, ": ", ActionString(a));
      result.push_back(a);
      if (a.type == ActionType::kForward) {
        forwarded.insert({a.microbatch, a.chunk});
        if (!seen_backward) pending_warmup.push_back(a);
      }
    }
    out.per_stage[st] = std::move(result);
  }
  return out;
}

int MaxInFlight(const Schedule& s, int stage) {
  EE_CHECK(stage >= 0 && stage < static_cast<int>(s.per_stage.size()), "stage ", stage);
  int in_flight = 0, peak = 0;
  for (const Action& a : s.per_stage[stage]) {
    if (a.type == ActionType::kForward) peak = std::max(peak, ++in_flight);
    if (a.type == ActionType::kBackward) --in_flight;
  }
  return peak;
}

absl::Status ValidateSchedule(const Schedule& s) {
  const int p = s.stages, v = s.chunks, m_count = s.microbatches;
  if (p < 1 || v < 1 || m_count < 1 || static_cast<int>(s.per_stage.size()) != p) {
    return absl::InvalidArgumentError(absl::StrCat("schedule '", s.name, "': stages=", p,
                                                   " chunks=", v, " microbatches=", m_count,
                                                   " with ", s.per_stage.size(), " stage lists"));
  }
  const int last_virtual = p * v - 1;
  // Channel (from stage, to stage, 0 = activations / 1 = gradients) -> message tags
  // (microbatch, receiving virtual stage) in send order and in receive order.
  using Channel = std::tuple<int, int, int>;
  std::map<Channel, std::vector<std::pair<int, int>>> sent, received;
  constexpr int kNumTypes = 7;
  for (int st = 0; st < p; ++st) {
    // pos[type][chunk][mb]: index of the action in the list, -1 if absent.
    std::vector<std::vector<std::vector<int>>> pos(
        kNumTypes, std::vector<std::vector<int>>(v, std::vector<int>(m_count, -1)));
    const std::vector<Action>& list = s.per_stage[st];
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[i];
      if (a.microbatch < 0 || a.microbatch >= m_count || a.chunk < 0 || a.chunk >= v) {
        return absl::InvalidArgumentError(
            absl::StrCat("stage ", st, " action ", i, " ", ActionString(a), " out of range"));
      }
      int& slot = pos[static_cast<int>(a.type)][a.chunk][a.microbatch];
      if (slot >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("stage ", st, ": ", ActionString(a), " appears twice"));
      }
      slot = i;
      const int vs = a.chunk * p + st;
      if (a.type == ActionType::kSendForward && vs < last_virtual)
        sent[{st, (vs + 1) % p, 0}].push_back({a.microbatch, vs + 1});
      if (a.type == ActionType::kRecvForward && vs > 0)
        received[{(vs - 1) % p, st, 0}].push_back({a.microbatch, vs});
      if (a.type == ActionType::kSendBackward && vs > 0)
        sent[{st, (vs - 1) % p, 1}].push_back({a.microbatch, vs - 1});
      if (a.type == ActionType::kRecvBackward && vs < last_virtual)
        received[{(vs + 1) % p, st, 1}].push_back({a.microbatch, vs});
    }
    auto at = [&](ActionType t, int c, int m) { return pos[static_cast<int>(t)][c][m]; };
    for (int c = 0; c < v; ++c) {
      const int vs = c * p + st;
      int exits = 0;
      for (int m = 0; m < m_count; ++m) {
        const int f = at(ActionType::kForward, c, m), b = at(ActionType::kBackward, c, m);
        const int e = at(ActionType::kExitHeads, c, m);
        const int rf = at(ActionType::kRecvForward, c, m), sf = at(ActionType::kSendForward, c, m);
        const int rb = at(ActionType::kRecvBackward, c, m);
        const int sb = at(ActionType::kSendBackward, c, m);
        const std::string where = absl::StrCat("stage ", st, " chunk ", c, " microbatch ", m);
        if (f < 0 || b < 0 || b < f)
          return absl::InvalidArgumentError(where + ": needs one Forward, then one Backward");
        if ((vs > 0) != (rf >= 0) || (rf >= 0 && rf > f))
          return absl::InvalidArgumentError(where + ": RecvForward missing, extra or after F");
        if ((vs < last_virtual) != (sf >= 0) || (sf >= 0 && sf < f))
          return absl::InvalidArgumentError(where + ": SendForward missing, extra or before F");
        if ((vs < last_virtual) != (rb >= 0) || (rb >= 0 && rb > b))
          return absl::InvalidArgumentError(where + ": RecvBackward missing, extra or after B");
        if ((vs > 0) != (sb >= 0) || (sb >= 0 && sb < b))
          return absl::InvalidArgumentError(where + ": SendBackward missing, extra or before B");
        if (e >= 0 && (e < f || e > b))
          return absl::InvalidArgumentError(where + ": ExitHeads not between Forward, Backward");
        exits += e >= 0;
      }
      if (exits != 0 && exits != m_count) {
        return absl::InvalidArgumentError(absl::StrCat("stage ", st, " chunk ", c,
                                                       ": ExitHeads for ", exits, " of ", m_count,
                                                       " microbatches"));
      }
    }
  }
  for (const auto& [channel, tags] : sent) {
    auto it = received.find(channel);
    if (it == received.end() || it->second != tags) {
      return absl::InvalidArgumentError(
          absl::StrCat("stage ", std::get<0>(channel), " -> ", std::get<1>(channel),
                       std::get<2>(channel) ? " gradients" : " activations",
                       ": receive order differs from send order"));
    }
  }
  if (sent.size() != received.size())
    return absl::InvalidArgumentError("a receive has no matching send");
  return absl::OkStatus();
}

}  // namespace eellm
