#include "parallel/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "parallel/comm/mpi_runtime.h"

namespace eellm {
namespace {

void CheckNccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) {
    AbortAllRanks(absl::StrCat("NCCL ", what, " failed: ", ncclGetErrorString(r)));
  }
}

void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    AbortAllRanks(absl::StrCat("CUDA ", what, " failed: ", cudaGetErrorString(e)));
  }
}

ncclRedOp_t ToNccl(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

// Waits on a CUDA event recorded after the queued work.
class EventRequest : public Request {
 public:
  explicit EventRequest(cudaStream_t stream) {
    CheckCuda(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate");
    CheckCuda(cudaEventRecord(event_, stream), "cudaEventRecord");
  }
  ~EventRequest() override {
    Wait();
    cudaEventDestroy(event_);
  }
  void Wait() override {
    if (done_) return;
    CheckCuda(cudaEventSynchronize(event_), "cudaEventSynchronize");
    done_ = true;
  }

 private:
  cudaEvent_t event_;
  bool done_ = false;
};

}  // namespace

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

NcclCommunicator::NcclCommunicator(std::unique_ptr<State> state, int rank, int size)
    : state_(std::move(state)), rank_(rank), size_(size) {}

NcclCommunicator::~NcclCommunicator() {
  if (state_->comm != nullptr) ncclCommDestroy(state_->comm);
  if (state_->stream != nullptr) cudaStreamDestroy(state_->stream);
}

std::unique_ptr<Communicator> NcclCommunicator::Create(Communicator* bootstrap) {
  // The id travels through host memory: the bootstrap is an MPI communicator on host buffers.
  ncclUniqueId id;
  if (bootstrap->rank() == 0) CheckNccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap->Broadcast(&id, sizeof(id), 0);
  auto state = std::make_unique<State>();
  CheckCuda(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  CheckNccl(ncclCommInitRank(&state->comm, bootstrap->size(), id, bootstrap->rank()),
            "ncclCommInitRank");
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(state), bootstrap->rank(), bootstrap->size()));
}

void NcclCommunicator::Sync() {
  CheckCuda(cudaStreamSynchronize(state_->stream), "cudaStreamSynchronize");
}

std::unique_ptr<Request> NcclCommunicator::Pending() {
  return std::make_unique<EventRequest>(state_->stream);
}

void NcclCommunicator::AllReduce(float* data, size_t n, ReduceOp op) {
  IAllReduce(data, n, op)->Wait();
}

std::unique_ptr<Request> NcclCommunicator::IAllReduce(float* data, size_t n, ReduceOp op) {
  CheckNccl(ncclAllReduce(data, data, n, ncclFloat32, ToNccl(op), state_->comm, state_->stream),
            "ncclAllReduce");
  return Pending();
}

void NcclCommunicator::AllGather(const float* send, float* recv, size_t n) {
  CheckNccl(ncclAllGather(send, recv, n, ncclFloat32, state_->comm, state_->stream),
            "ncclAllGather");
  Sync();
}

void NcclCommunicator::ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) {
  CheckNccl(ncclReduceScatter(send, recv, n, ncclFloat32, ToNccl(op), state_->comm, state_->stream),
            "ncclReduceScatter");
  Sync();
}

void NcclCommunicator::Broadcast(void* data, size_t bytes, int root) {
  CheckNccl(ncclBroadcast(data, data, bytes, ncclUint8, root, state_->comm, state_->stream),
            "ncclBroadcast");
  Sync();
}

// NCCL matches point-to-point messages in order per peer; tags are not needed (the schedules
// keep the per-channel order, see parallel/pipeline).
void NcclCommunicator::Send(const void* data, size_t bytes, int peer, int tag) {
  ISend(data, bytes, peer, tag)->Wait();
}

void NcclCommunicator::Recv(void* data, size_t bytes, int peer, int tag) {
  IRecv(data, bytes, peer, tag)->Wait();
}

std::unique_ptr<Request> NcclCommunicator::ISend(const void* data, size_t bytes, int peer,
                                                 int /*tag*/) {
  CheckNccl(ncclSend(data, bytes, ncclUint8, peer, state_->comm, state_->stream), "ncclSend");
  return Pending();
}

std::unique_ptr<Request> NcclCommunicator::IRecv(void* data, size_t bytes, int peer, int /*tag*/) {
  CheckNccl(ncclRecv(data, bytes, ncclUint8, peer, state_->comm, state_->stream), "ncclRecv");
  return Pending();
}

void NcclCommunicator::Barrier() {
  float* one = nullptr;
  CheckCuda(cudaMallocAsync(reinterpret_cast<void**>(&one), sizeof(float), state_->stream),
            "cudaMallocAsync");
  CheckNccl(ncclAllReduce(one, one, 1, ncclFloat32, ncclSum, state_->comm, state_->stream),
            "ncclAllReduce (barrier)");
  CheckCuda(cudaFreeAsync(one, state_->stream), "cudaFreeAsync");
  Sync();
}

std::unique_ptr<Communicator> NcclCommunicator::Subgroup(const std::vector<int>& ranks) {
  int color = -1, key = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] == rank_) key = static_cast<int>(i);
    if (color < 0 || ranks[i] < color) color = ranks[i];
  }
  if (key < 0) AbortAllRanks(absl::StrCat("rank ", rank_, " is not in its own subgroup"));
  auto state = std::make_unique<State>();
  CheckCuda(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  CheckNccl(ncclCommSplit(state_->comm, color, key, &state->comm, nullptr), "ncclCommSplit");
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(state), key, static_cast<int>(ranks.size())));
}

}  // namespace eellm
