// Communicator: the collective and point-to-point operations the parallel engine needs, on
// device buffers of fp32 (or raw bytes for broadcast/send of control data). Implementations:
// MPI (host buffers; device buffers are staged through host memory) and, with CUDA, NCCL.
// Operations are blocking unless named I*, which return a Request to Wait() on: on return the
// results are ready for the backend (NCCL's collectives make the backend's stream wait for them on
// the device, without a host wait: read them on the host through the backend's copies). A
// communication failure is fatal: it prints the error and aborts every rank (MPI_Abort), so no rank
// hangs.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace eellm {

enum class ReduceOp { kSum, kMax };

class Request {
 public:
  virtual ~Request() = default;
  virtual void Wait() = 0;
  // Whether the operation has completed, without blocking where the communicator can tell (MPI);
  // once true, Wait() returns at once. Default: Wait(), then true.
  virtual bool Test() {
    Wait();
    return true;
  }
  // Whether the operation has been posted (false while a communicator holds it; see PostHeld).
  virtual bool posted() const { return true; }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "nccl"

  // In place: data[n] on every rank becomes the reduction over ranks.
  virtual void AllReduce(float* data, size_t n, ReduceOp op) = 0;
  // recv[size * n] = concatenation of every rank's send[n] in rank order.
  virtual void AllGather(const float* send, float* recv, size_t n) = 0;
  // send[size * n]; rank r receives recv[n] = reduction over ranks of send[r*n .. r*n+n).
  virtual void ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) = 0;
  virtual void Broadcast(void* data, size_t bytes, int root) = 0;
  virtual void Send(const void* data, size_t bytes, int peer, int tag) = 0;
  virtual void Recv(void* data, size_t bytes, int peer, int tag) = 0;
  virtual std::unique_ptr<Request> ISend(const void* data, size_t bytes, int peer, int tag) = 0;
  virtual std::unique_ptr<Request> IRecv(void* data, size_t bytes, int peer, int tag) = 0;
  // Posts the point-to-point operations this communicator holds back, as one group. NCCL holds
  // every ISend and IRecv until PostHeld, a Wait on one of them or any other operation, so that
  // neighbours' crossing messages are posted together (parallel/pipeline/send_posting.h); MPI
  // posts each at once. Default: none held.
  virtual void PostHeld() {}
  virtual std::unique_ptr<Request> IAllReduce(float* data, size_t n, ReduceOp op) = 0;
  virtual void Barrier() = 0;

  // A communicator over `ranks` (ranks of this communicator, in new-rank order); every rank of
  // this communicator must call it (collectively) with its own group; returns this rank's.
  virtual std::unique_ptr<Communicator> Subgroup(const std::vector<int>& ranks) = 0;
};

}  // namespace eellm
