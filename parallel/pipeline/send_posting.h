// When a pipeline stage's sends leave, and a check that they can all complete under NCCL's
// rendezvous semantics.
//
// MPI's isend leaves at once and never waits. NCCL's send is a kernel on the communicator's
// stream that completes only when the receiver has posted the matching receive, so two
// neighbours that each post a send before the receive matching the other's send deadlock (1F1B's
// steady state does exactly that: SendForward then RecvBackward on one stage, SendBackward then
// RecvForward on the next). The NCCL communicator therefore holds sends back and posts them in
// one group with the stage's next receive. Held to the next receive, though, the first stage's
// warm-up activations (it receives nothing until its first gradient) would leave only when its
// warm-up ends, and the second stage would start (stages - 1) forwards late. So the executor
// starts a send at once when the stage's next message is another send or there is none
// (StartSendAtOnce), as Megatron's warm-up and cool-down do; a send followed by a receive stays
// grouped with it. CheckRendezvous runs a schedule under that rule: 1F1B and all-forward-all-
// backward never deadlock; Megatron's interleaved order does when there are more microbatches
// than stages, however sends are grouped (its neighbours' crossing messages pair up only if
// receives are posted ahead of the compute that needs them, as Megatron's batched exchanges
// do), so those runs keep their pipeline group on MPI (PipelineFitsRendezvous).
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "parallel/pipeline/schedule.h"

namespace eellm {

// Whether the send at actions[i] (a SendForward or SendBackward of `stage`) should leave at once
// rather than with the stage's next receive: true when the next message action after i is a
// send, or there is none. With stages == 1 every message stays on the rank (false).
bool StartSendAtOnce(const std::vector<Action>& actions, size_t i, int stages);

// The rule that decides which sends leave at once (the rest wait for the next receive, or the
// end of the list).
using SendRule = std::function<bool(const std::vector<Action>& actions, size_t i, int stages)>;

// Runs every stage's actions with NCCL-like messages: sends held back are posted together with
// the stage's next receive as one group (or at the end of the list), a send that `rule` starts
// at once is posted alone with the sends held before it; a stage waits for each group it posts
// to complete (the CPU emulation of NCCL does the same, which is stricter than a GPU stream);
// an operation completes when its counterpart is in the peer's current group, a group when all
// of its operations have. Returns OK when every stage reaches the end, else an error naming the
// groups each stage is stuck in. Compute actions take no time here; see simulator.h for timing.
absl::Status CheckRendezvous(const Schedule& s, const SendRule& rule = StartSendAtOnce);

// Whether the pipeline messages of the training schedule for `stages`, `microbatches` and
// `chunks` (1F1B, or interleaved 1F1B when chunks > 1; exit-head placement adds no message) can
// run on NCCL as the executor posts them (CheckRendezvous). False for the interleaved order with
// more microbatches than stages: there two neighbours each wait in a send whose receive the
// other posts only after its own send completes, whatever sends are grouped with; such a run
// keeps its pipeline group on MPI, whose sends never wait.
bool PipelineFitsRendezvous(int stages, int microbatches, int chunks);

}  // namespace eellm
