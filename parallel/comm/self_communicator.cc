#include "parallel/comm/self_communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/backend.h"
#include "parallel/comm/mpi_runtime.h"

namespace eellm {
namespace {

class DoneRequest final : public Request {
 public:
  void Wait() override {}
};

}  // namespace

void SelfCommunicator::CopyFloats(float* dst, const float* src, size_t n) {
  if (dst == src || n == 0) return;
  if (backend_ != nullptr) {
    backend_->Copy(dst, src, n * sizeof(float));
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

void SelfCommunicator::PointToPoint(const char* op, int peer, int tag) {
  AbortAllRanks(absl::StrCat("SelfCommunicator::", op, "(peer ", peer, ", tag ", tag,
                             "): a communicator of one rank has no peer to exchange messages "
                             "with (a message to itself would deadlock)"));
}

void SelfCommunicator::AllReduce(float*, size_t, ReduceOp) {}

void SelfCommunicator::AllGather(const float* send, float* recv, size_t n) {
  CopyFloats(recv, send, n);
}

void SelfCommunicator::ReduceScatter(const float* send, float* recv, size_t n, ReduceOp) {
  CopyFloats(recv, send, n);
}

void SelfCommunicator::Broadcast(void*, size_t, int root) {
  if (root != 0) {
    AbortAllRanks(absl::StrCat("SelfCommunicator::Broadcast: root ", root,
                               " is not a rank of a communicator of size 1"));
  }
}

void SelfCommunicator::Send(const void*, size_t, int peer, int tag) {
  PointToPoint("Send", peer, tag);
}
void SelfCommunicator::Recv(void*, size_t, int peer, int tag) { PointToPoint("Recv", peer, tag); }
std::unique_ptr<Request> SelfCommunicator::ISend(const void*, size_t, int peer, int tag) {
  PointToPoint("ISend", peer, tag);
}
std::unique_ptr<Request> SelfCommunicator::IRecv(void*, size_t, int peer, int tag) {
  PointToPoint("IRecv", peer, tag);
}

std::unique_ptr<Request> SelfCommunicator::IAllReduce(float*, size_t, ReduceOp) {
  return std::make_unique<DoneRequest>();
}

std::unique_ptr<Communicator> SelfCommunicator::Subgroup(const std::vector<int>& ranks) {
  if (ranks != std::vector<int>{0}) {
    AbortAllRanks(absl::StrCat("SelfCommunicator::Subgroup([", absl::StrJoin(ranks, ", "),
                               "]): the only group of a one-rank communicator is [0]"));
  }
  return std::make_unique<SelfCommunicator>(backend_);
}

}  // namespace eellm
