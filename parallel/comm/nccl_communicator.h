// NcclCommunicator: the Communicator on GPU buffers over NCCL (built only with CUDA and NCCL).
// Point-to-point operations are held and posted as one NCCL group (see PostHeld). The
// NCCL unique id is created on rank 0 and broadcast over a bootstrap communicator (MPI); sub-groups
// come from ncclCommSplit. Each communicator owns a CUDA stream: blocking operations synchronise
// it, non-blocking ones return a Request that waits on a CUDA event. A failure aborts every rank
// with NCCL's error string. NCCL refuses two ranks on one GPU: tests with several ranks on one
// GPU use the MPI communicator with device staging instead.
#pragma once

#include <memory>

#include "parallel/comm/communicator.h"
#include "parallel/parallel_context.h"

namespace eellm {

class NcclCommunicator : public Communicator {
 public:
  // Collective over `bootstrap`: one NCCL communicator of the same ranks, on the current device.
  static std::unique_ptr<Communicator> Create(Communicator* bootstrap);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  void AllReduce(float* data, size_t n, ReduceOp op) override;
  void AllGather(const float* send, float* recv, size_t n) override;
  void ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) override;
  void Broadcast(void* data, size_t bytes, int root) override;
  void Send(const void* data, size_t bytes, int peer, int tag) override;
  void Recv(void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> ISend(const void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> IRecv(void* data, size_t bytes, int peer, int tag) override;
  // Posts the held ISends and IRecvs in one NCCL group. Called by a Wait on any of them and
  // before any other operation: the pipeline schedules post a send and then the receive from the
  // same neighbour on both sides (or batched exchanges of both directions), which would
  // deadlock ungrouped.
  void PostHeld() override;
  std::unique_ptr<Request> IAllReduce(float* data, size_t n, ReduceOp op) override;
  void Barrier() override;
  std::unique_ptr<Communicator> Subgroup(const std::vector<int>& ranks) override;

  struct State;  // NCCL and CUDA handles (kept out of this header)

 private:
  explicit NcclCommunicator(std::unique_ptr<State> state, int rank, int size);
  std::unique_ptr<Request> Pending();  // a Request for the work queued so far
  friend class HeldRequest;
  void Sync();
  void AfterCompute();  // orders the next operation after the work queued on the compute stream
  void ComputeAfter();  // orders the compute stream's next work after the operation just queued

  std::unique_ptr<State> state_;
  int rank_, size_;
};

// Replaces the tensor-, data- and pipeline-parallel groups of `ctx` (made over MPI by
// ParallelContext::Create) by NCCL communicators of the same ranks: activations every layer,
// gradients every step, ZeRO-1 gathers and pipeline messages (and the trainer's group of the
// stages that hold the word embedding, split from the pipeline group). The world and
// ParallelContext's embedding group stay on MPI. `host_world`: an MPI world communicator on host
// memory (NCCL's id travels through it). Collective over the world.
void UseNcclForModelParallel(ParallelContext* ctx, Communicator* host_world);

}  // namespace eellm
