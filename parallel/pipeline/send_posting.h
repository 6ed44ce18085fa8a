// When a pipeline stage's messages are posted, and a check that they can all complete under
// NCCL's rendezvous semantics.
//
// MPI's isend leaves at once and never waits. NCCL's send is a kernel on the communicator's
// stream that completes only when the receiver has posted the matching receive, so two
// neighbours that each post a send before the receive matching the other's send deadlock (1F1B's
// steady state does exactly that: SendForward then RecvBackward on one stage, SendBackward then
// RecvForward on the next). The NCCL communicator therefore holds sends and receives back and
// the executor posts them in groups (PostAfter): a run of consecutive messages that holds a
// receive is one group, with any sends held before it; sends alone leave at once when the
// stage's next message is another send or there is none (the first stage's warm-up activations,
// which would otherwise make the second stage start (stages - 1) forwards late), as Megatron's
// warm-up and cool-down do. CheckRendezvous runs a schedule under that rule: 1F1B and all-
// forward-all-backward never deadlock. Megatron's interleaved order does when there are more
// microbatches than stages, however its sends are grouped: neighbours' crossing messages pair up
// only when each stage sends what a segment of compute produced and receives what the next one
// needs in one group, as Megatron's batched exchanges do (BatchExchanges, schedule.h), which the
// executor runs for interleaved schedules.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "parallel/pipeline/schedule.h"

namespace eellm {

// Whether the point-to-point operations a stage holds are posted, as one group, after the
// message action at actions[i]. A run of consecutive messages is one group: after its last
// action it is posted when it holds a receive; a run of sends alone leaves then too unless the
// stage's next message is a receive, with which it is then grouped. With stages == 1 every
// message stays on the rank (false).
bool PostAfter(const std::vector<Action>& actions, size_t i, int stages);

// The rule that decides after which message actions the held operations are posted.
using PostRule = std::function<bool(const std::vector<Action>& actions, size_t i, int stages)>;

// Runs every stage's actions with NCCL-like messages: the operations held are posted as one group
// after each message action where `rule` says so (and at the end of the list); a stage waits
// for each group it posts to complete (the CPU emulation of NCCL does the same, which is stricter
// than a GPU stream); an operation completes when its counterpart is in the peer's current group, a
// group when all of its operations have. Returns OK when every stage reaches the end, else an error
// naming the groups each stage is stuck in. Compute actions take no time here; see simulator.h for
// timing.
absl::Status CheckRendezvous(const Schedule& s, const PostRule& rule = PostAfter);

}  // namespace eellm
