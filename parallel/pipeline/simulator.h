// A cost-model simulator for pipeline schedules: runs a Schedule with per-stage compute costs,
// honouring the receive/send dependencies between stages, and returns the timeline (busy
// intervals per stage, makespan, bubble). Used to test the schedules (bubble formulas, deadlock
// freedom) and to compare exit-head placements; also renders timelines as text.
//
// Model: each stage executes its actions in order on one compute stream. Forward, Backward and
// ExitHeads take the stage's cost; sends take no stage time and never block (isend), their
// message arrives `p2p_latency` later; a receive blocks until the matching message has arrived.
// Messages on a channel (from stage, to stage, activations or gradients) are matched in order; a
// receive whose matching message carries another microbatch or chunk is an error. When no stage
// can make progress and some are unfinished the schedule deadlocks: Simulate returns an error
// naming what each blocked stage waits for (deadlock does not depend on the costs).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/pipeline/schedule.h"

namespace eellm {

// Costs of one action of one model chunk on one microbatch, per stage.
struct PipelineCosts {
  std::vector<double> forward;   // [stage]
  std::vector<double> backward;  // [stage]
  // [stage]: exit-head work (forward, loss, backward of the chunk's exits) per microbatch; 0 for
  // stages without exits. On a stage whose action list has no ExitHeads actions this time is
  // added to every Backward (exit work fused into the backward, EE-LLM's default).
  std::vector<double> exit;
  double p2p_latency = 0.0;
};

// Same costs on every stage.
PipelineCosts UniformCosts(int stages, double forward, double backward, double exit);

struct BusyInterval {
  double start;
  double end;
  Action action;  // kForward, kBackward or kExitHeads
};

struct Timeline {
  int stages = 0;
  double makespan = 0.0;                        // end of the last action on any stage
  std::vector<std::vector<BusyInterval>> busy;  // [stage], in time order
  std::vector<double> busy_time;                // [stage]: sum of busy interval lengths
  std::vector<double> idle_time;                // [stage]: makespan - busy_time
};

// Runs the schedule. Errors: costs sized wrongly or negative, a receive matched by a message of
// another microbatch or chunk, a send never received, or deadlock.
absl::StatusOr<Timeline> Simulate(const Schedule& s, const PipelineCosts& costs);

// Idle time over all stages / (stages * makespan): the share of device time lost to bubbles.
// For 1F1B with uniform costs and no latency this is (p - 1) / (m + p - 1).
double BubbleFraction(const Timeline& t);
// Megatron's definition: bubble time / ideal time = total idle / total busy. For uniform costs
// (p - 1) / m for 1F1B and AFAB, (p - 1) / (v * m) for interleaved 1F1B with v chunks.
double BubbleOverIdeal(const Timeline& t);

// One row per stage, `width` characters spanning [0, makespan): F forward, B backward, E exit
// heads, '.' idle (each character shows what runs at the middle of its time slice).
std::string RenderTimeline(const Timeline& t, int width);

}  // namespace eellm
