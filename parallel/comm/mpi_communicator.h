// MpiCommunicator: the Communicator contract over MPI. Buffers belong to `backend` (null means
// host memory): on the CPU backend (or null) MPI reads and writes them directly; on any other
// device each operation stages the data through host memory (CopyToHost, MPI, CopyFromHost),
// which is correct but slow (the NCCL communicator is the fast GPU path).
//
// Every MPI call's return code is checked (the communicators use MPI_ERRORS_RETURN); a failure
// aborts the whole job through AbortAllRanks with MPI's error string. Counts above INT_MAX
// elements are split into several MPI calls. The MPI handle is hidden, so this header does not
// include mpi.h.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm/communicator.h"

namespace eellm {

class Backend;

class MpiCommunicator final : public Communicator {
 public:
  // All ranks of the job, on a duplicate of MPI_COMM_WORLD (so its messages never mix with
  // another library's). Collective. MPI must be active (an MpiRuntime exists), else aborts.
  static std::unique_ptr<Communicator> World(Backend* backend);

  ~MpiCommunicator() override;  // frees the MPI communicator (if MPI is still active)

  int rank() const override;
  int size() const override;
  std::string name() const override { return "mpi"; }

  void AllReduce(float* data, size_t n, ReduceOp op) override;
  // In place is allowed: send == recv + rank * n.
  void AllGather(const float* send, float* recv, size_t n) override;
  // send and recv must not overlap.
  void ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) override;
  void Broadcast(void* data, size_t bytes, int root) override;
  // A Recv whose message is shorter or longer than `bytes` aborts (naming peer and tag).
  void Send(const void* data, size_t bytes, int peer, int tag) override;
  void Recv(void* data, size_t bytes, int peer, int tag) override;
  // The buffers must stay valid (and, for ISend/IAllReduce, unmodified) until Wait() returns.
  // Destroying a Request that was not waited on waits for it.
  std::unique_ptr<Request> ISend(const void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> IRecv(void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> IAllReduce(float* data, size_t n, ReduceOp op) override;
  void Barrier() override;

  // MPI_Comm_split with color = smallest rank of the group and key = position in `ranks`.
  // Aborts unless `ranks` is a valid list holding this rank and the group MPI formed is exactly
  // `ranks` (i.e. every member passed the same list).
  std::unique_ptr<Communicator> Subgroup(const std::vector<int>& ranks) override;

  // The largest element count (floats or bytes) passed to one MPI call; INT_MAX by default.
  // Tests lower it to exercise the splitting of large operations. Process-wide; returns the
  // previous value. Every rank must use the same value.
  static size_t SetMaxCountForTesting(size_t count);

  struct Impl;  // MPI_Comm and the staging state (mpi_communicator.cc)

 private:
  explicit MpiCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace eellm
