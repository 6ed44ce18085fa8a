// Pipeline-parallel schedules as data: for every pipeline stage (rank in the pipeline group) an
// ordered list of actions (receive, compute, send, exit-head work). The builders reproduce
// Megatron-LM's schedules (all-forward-all-backward, non-interleaved 1F1B, interleaved 1F1B with
// virtual stages); PlaceExitHeads moves early-exit head work into the pipeline bubbles. An
// executor walks a stage's list and performs each action; the simulator (simulator.h) runs the
// same lists under a cost model. Nothing here knows a model or a communicator.
//
// Conventions
// - Virtual stage: model chunk `c` of stage `s` holds virtual stage v = c * stages + s (Megatron).
//   Activations flow v -> v + 1 (so the last stage's chunk c feeds chunk c + 1 of stage 0) and
//   gradients v + 1 -> v. Without interleaving chunks == 1 and v == s.
// - Every Forward(m, c) is preceded by RecvForward(m, c) unless v is the first virtual stage and
//   followed by SendForward(m, c) unless v is the last; every Backward(m, c) is preceded by
//   RecvBackward(m, c) unless v is the last virtual stage and followed by SendBackward(m, c)
//   unless v is the first. With stages == 1 and chunks > 1 the neighbour is the stage itself
//   (the executor passes the tensor locally).
// - Sends are asynchronous (isend: they never wait for the receiver; the executor waits on them
//   before reusing the buffer); receives block. Messages between two stages in one direction are
//   matched in order, so on every channel the receiver's receive order equals the sender's send
//   order. The builders emit sends right after the compute that produces the tensor and
//   receives right before the compute that needs it, so the timing depends only on compute
//   dependencies; BatchExchanges (below) delays sends and posts receives one segment early.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace eellm {

enum class ActionType {
  kRecvForward,   // receive microbatch m's input activations for chunk c from virtual stage v-1
  kForward,       // forward of chunk c on microbatch m; saves its activation record
  kSendForward,   // send the output activations to virtual stage v+1
  kRecvBackward,  // receive the gradient w.r.t. the output from virtual stage v+1
  kBackward,      // backward of chunk c on microbatch m; frees its activation record
  kSendBackward,  // send the gradient w.r.t. the input to virtual stage v-1
  kExitHeads,     // the chunk's exit heads on microbatch m: forward, loss and backward (below)
};

struct Action {
  ActionType type;
  int microbatch;
  int chunk;  // model chunk (virtual stage = chunk * stages + stage); 0 without interleaving
  bool operator==(const Action& o) const {
    return type == o.type && microbatch == o.microbatch && chunk == o.chunk;
  }
  bool operator!=(const Action& o) const { return !(*this == o); }
};

struct Schedule {
  int stages = 1;
  int microbatches = 1;
  int chunks = 1;
  std::vector<std::vector<Action>> per_stage;  // [stage] -> actions in execution order
  std::string name;                            // "AFAB", "1F1B", "interleaved-1F1B"
};

// Kinds of action: compute (Forward, Backward, ExitHeads), send, receive; a message is either.
bool IsCompute(ActionType t);
bool IsSend(ActionType t);
bool IsRecv(ActionType t);
bool IsMessage(ActionType t);

// "F", "B", "E", "RF", "SF", "RB", "SB".
const char* ActionTypeName(ActionType t);
// e.g. "F(3,c1)"; the chunk is omitted when it is 0.
std::string ActionString(const Action& a);
// One line per stage, actions separated by spaces (for test failures and debugging).
std::string ScheduleString(const Schedule& s);

// GPipe order: all forwards, then all backwards (in the same microbatch order). Holds every
// microbatch in flight. Requires stages >= 1, microbatches >= 1 (checked: the run config
// validates user input before building a schedule).
Schedule AllForwardAllBackward(int stages, int microbatches);

// Megatron's non-interleaved 1F1B: stage s runs min(stages - s - 1, microbatches) warm-up
// forwards, then alternates one forward and one backward, then runs the remaining (cool-down)
// backwards. At most stages - s microbatches are in flight on stage s.
Schedule OneFOneB(int stages, int microbatches);

// Megatron's interleaved 1F1B with `chunks` model chunks (virtual stages) per stage. Forwards
// run in groups of `stages` microbatches, chunk by chunk (chunk 0 of microbatches 0..p-1, then
// chunk 1 of the same microbatches, ...); backwards in the same order with the chunks reversed.
// Stage s runs min(2 * (stages - s - 1) + (chunks - 1) * stages, chunks * microbatches) warm-up
// forwards (all of them when microbatches == stages, as in Megatron). Bubble time shrinks by a
// factor `chunks` compared with 1F1B. Requires microbatches % stages == 0; chunks == 1 gives
// OneFOneB. Errors name the bad numbers.
absl::StatusOr<Schedule> Interleaved1F1B(int stages, int microbatches, int chunks);

// The same compute order with every message moved to a batched exchange, as Megatron's
// interleaved schedule does on NCCL (send_forward_backward_recv_forward_backward): the stage's
// computes are cut into segments (a steady-state forward with the backward after it, or a
// forward or a backward alone), and after each segment one run of messages sends what the
// segment produced (its SendForward, then its SendBackward) and receives what the next segment
// needs (its RecvForward, then its RecvBackward); the first segment's receives come first.
// Per-channel message order and the order of forwards and backwards are unchanged, so the
// results are the same; sends leave later and receives are posted earlier. ExitHeads move to
// right before their backward: left in the bubbles PlaceExitHeads chose, they would hold back
// the sends of the segment they land in. Simulated (interleaved, pp 2-8, 2 and 4 chunks,
// microbatches 2 and 4 x pp, f = 1, b = 2 per model, exits 0.25-0.5 on every other virtual
// stage): left in place, steps up to 20% longer than unbatched with exits placed; moved, -3.5%
// to +2.3%; without exits the makespan is the unbatched one exactly. Under NCCL's rendezvous
// sends each run is posted as one group (send_posting.h), which interleaved 1F1B with more
// microbatches than stages needs.
Schedule BatchExchanges(const Schedule& s);

// Early-exit head placement (our improvement over EE-LLM's bubble filling).
//
// The exit-head work of microbatch m on a stage is: the forward of the chunk's exit heads on the
// hidden states its Forward(m) produced, their losses, and their backward. That backward yields
// (a) the exit parameters' gradients, accumulated into the gradient arena like any microbatch's,
// and (b) the gradient of the exit losses w.r.t. the stage's hidden states at the exit points,
// which is *stored* in microbatch m's activation record; when Backward(m) reaches an exit's layer
// it adds the stored gradient to the gradient coming from the next stage. The sum is exactly the
// gradient of  final loss + sum of weighted exit losses  (EE-LLM's auxiliary-loss backprop), so no
// gradient is dropped or truncated, unlike EE-LLM's bubble filling, which runs partial forwards
// and truncated backwards of extra microbatches. The cost: one stored hidden-state-sized tensor
// per exit per in-flight microbatch until Backward(m); exit logits are freed inside ExitHeads(m).
//
// Without placement the exit work is fused into Backward(m) (EE-LLM's default: the exit forward
// runs at the backward slot). With placement it becomes an ExitHeads(m, c) action:
// - for forwards run before the stage's first backward (warm-up, where the stage would
//   otherwise wait for the first gradient to come back), right before that first
//   RecvBackward / Backward, in forward order;
// - for the other microbatches (steady state and cool-down), right before RecvBackward(m, c)
//   (or Backward(m, c) on the last virtual stage), where the stage would wait for the gradient.
// Simulated (1F1B, p in {2, 4, 8}, m in {4, ..., 32}, exit cost 0.25 to 2 per microbatch with
// f = 1, b = 2): never slower than putting every ExitHeads right after its Forward or every one
// right before its backward, and up to one time unit faster (pp=4, m=8, e=0.5: 35 vs 35.5).
// Invariants: ExitHeads(m, c) comes after Forward(m, c) and before Backward(m, c), exactly once
// per microbatch and chunk of every virtual stage with exits, none elsewhere.
//
// `has_exits` is indexed by stage (size stages: every chunk of the stage has exits) or by virtual
// stage (size stages * chunks: chunk * stages + stage). Existing ExitHeads actions are removed
// first.
Schedule PlaceExitHeads(const Schedule& s, const std::vector<bool>& has_exits);

// Peak number of (microbatch, chunk) activation records held on `stage`: Forward ran and
// Backward has not yet (the activation-memory bound; each record holds one chunk's activations).
int MaxInFlight(const Schedule& s, int stage);

// Checks the structural invariants above: each (microbatch, chunk) gets exactly one Forward and
// one Backward on every stage, Forward before Backward, receives before and sends after the
// compute they belong to and only where a neighbour exists, ExitHeads between Forward and
// Backward and on a virtual stage either for every microbatch or for none, and on every channel
// the receive order equals the send order. Whether the schedule can deadlock (a cycle of
// blocked receives) is found by Simulate (simulator.h).
absl::Status ValidateSchedule(const Schedule& s);

}  // namespace eellm
