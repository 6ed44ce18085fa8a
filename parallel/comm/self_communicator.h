// SelfCommunicator: the Communicator of a single rank, without MPI. Reductions are the
// identity, gathers and scatters copy (with the backend's Copy when a backend is given, memcpy
// otherwise), broadcasts from rank 0 do nothing. Point-to-point messages to oneself would
// deadlock a real pipeline, so Send/Recv/ISend/IRecv abort with a message instead.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "parallel/comm/communicator.h"

namespace eellm {

class Backend;

class SelfCommunicator final : public Communicator {
 public:
  // `backend` owns the buffers (null: host memory).
  explicit SelfCommunicator(Backend* backend = nullptr) : backend_(backend) {}

  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "self"; }

  void AllReduce(float* data, size_t n, ReduceOp op) override;
  void AllGather(const float* send, float* recv, size_t n) override;
  void ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) override;
  void Broadcast(void* data, size_t bytes, int root) override;
  void Send(const void* data, size_t bytes, int peer, int tag) override;
  void Recv(void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> ISend(const void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> IRecv(void* data, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Request> IAllReduce(float* data, size_t n, ReduceOp op) override;
  void Barrier() override {}
  // Only {0} is a valid group; returns another SelfCommunicator on the same backend.
  std::unique_ptr<Communicator> Subgroup(const std::vector<int>& ranks) override;

 private:
  void CopyFloats(float* dst, const float* src, size_t n);
  [[noreturn]] void PointToPoint(const char* op, int peer, int tag);

  Backend* backend_;
};

}  // namespace eellm
