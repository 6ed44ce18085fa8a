#include "parallel/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <string>
#include <vector>

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

// A CUDA event recorded after one NCCL group, shared by the group's operations.
struct GroupEvent {
  cudaEvent_t event = nullptr;
  ~GroupEvent() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};

// A held point-to-point operation: queued by the next PostHeld, then done when its group's
// event has completed.
struct HeldOp {
  bool send = false;
  void* data = nullptr;
  size_t bytes = 0;
  int peer = -1;
  std::shared_ptr<GroupEvent> done_event;  // set when queued
  bool done = false;
};

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t compute_done = nullptr;  // recorded on the backends' stream before each operation
  cudaEvent_t op_done = nullptr;  // recorded on this stream after a collective the backends wait on
  float* barrier_word = nullptr;  // one zeroed float that Barrier all-reduces
  std::vector<std::shared_ptr<HeldOp>> held;  // operations not yet queued, in posting order
};

// The Request of a held operation: waiting posts it first if nothing has.
class HeldRequest : public Request {
 public:
  HeldRequest(NcclCommunicator* comm, std::shared_ptr<HeldOp> op)
      : comm_(comm), op_(std::move(op)) {}
  ~HeldRequest() override { Wait(); }
  void Wait() override {
    if (op_->done) return;
    if (op_->done_event == nullptr) comm_->PostHeld();
    CheckCuda(cudaEventSynchronize(op_->done_event->event), "cudaEventSynchronize");
    op_->done_event.reset();
    op_->done = true;
  }
  bool posted() const override { return op_->done || op_->done_event != nullptr; }

 private:
  NcclCommunicator* comm_;
  std::shared_ptr<HeldOp> op_;
};

namespace {
std::unique_ptr<NcclCommunicator::State> NewState() {
  auto state = std::make_unique<NcclCommunicator::State>();
  CheckCuda(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  CheckCuda(cudaEventCreateWithFlags(&state->compute_done, cudaEventDisableTiming),
            "cudaEventCreate");
  CheckCuda(cudaEventCreateWithFlags(&state->op_done, cudaEventDisableTiming), "cudaEventCreate");
  CheckCuda(cudaMalloc(reinterpret_cast<void**>(&state->barrier_word), sizeof(float)),
            "cudaMalloc");
  CheckCuda(cudaMemset(state->barrier_word, 0, sizeof(float)), "cudaMemset");
  return state;
}
}  // namespace

NcclCommunicator::NcclCommunicator(std::unique_ptr<State> state, int rank, int size)
    : state_(std::move(state)), rank_(rank), size_(size) {}

NcclCommunicator::~NcclCommunicator() {
  // Held operations nobody waited for: posting them could hang (a receive without its send).
  if (!state_->held.empty()) {
    AbortAllRanks(absl::StrCat("NCCL communicator destroyed with ", state_->held.size(),
                               " point-to-point operations never posted or waited for"));
  }
  if (state_->comm != nullptr) ncclCommDestroy(state_->comm);
  if (state_->stream != nullptr) cudaStreamDestroy(state_->stream);
  if (state_->compute_done != nullptr) cudaEventDestroy(state_->compute_done);
  if (state_->op_done != nullptr) cudaEventDestroy(state_->op_done);
  if (state_->barrier_word != nullptr) cudaFree(state_->barrier_word);
}

// The backends compute on the legacy default stream, with which this communicator's
// non-blocking stream does not synchronise implicitly: without this wait an operation could read
// a buffer before the kernel that writes it has run. (Results are handed back on the device by
// blocking collectives, ComputeAfter; the others return a Request to Wait on.)
void NcclCommunicator::AfterCompute() {
  CheckCuda(cudaEventRecord(state_->compute_done, nullptr), "cudaEventRecord");
  CheckCuda(cudaStreamWaitEvent(state_->stream, state_->compute_done, 0), "cudaStreamWaitEvent");
}

std::unique_ptr<Communicator> NcclCommunicator::Create(Communicator* bootstrap) {
  // The id travels through host memory: the bootstrap is an MPI communicator on host buffers.
  ncclUniqueId id;
  if (bootstrap->rank() == 0) CheckNccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap->Broadcast(&id, sizeof(id), 0);
  auto state = NewState();
  CheckNccl(ncclCommInitRank(&state->comm, bootstrap->size(), id, bootstrap->rank()),
            "ncclCommInitRank");
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(state), bootstrap->rank(), bootstrap->size()));
}

void NcclCommunicator::Sync() {
  CheckCuda(cudaStreamSynchronize(state_->stream), "cudaStreamSynchronize");
}

// The other direction: the backends' stream waits (on the device, the host does not) for the
// operation just queued, so the kernels that read its results, and the copies that bring them to
// the host (on that stream), come after it. The host goes on queueing work meanwhile.
void NcclCommunicator::ComputeAfter() {
  CheckCuda(cudaEventRecord(state_->op_done, state_->stream), "cudaEventRecord");
  CheckCuda(cudaStreamWaitEvent(nullptr, state_->op_done, 0), "cudaStreamWaitEvent");
}

std::unique_ptr<Request> NcclCommunicator::Pending() {
  return std::make_unique<EventRequest>(state_->stream);
}

void NcclCommunicator::AllReduce(float* data, size_t n, ReduceOp op) {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclAllReduce(data, data, n, ncclFloat32, ToNccl(op), state_->comm, state_->stream),
            "ncclAllReduce");
  ComputeAfter();
}

std::unique_ptr<Request> NcclCommunicator::IAllReduce(float* data, size_t n, ReduceOp op) {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclAllReduce(data, data, n, ncclFloat32, ToNccl(op), state_->comm, state_->stream),
            "ncclAllReduce");
  return Pending();
}

void NcclCommunicator::AllGather(const float* send, float* recv, size_t n) {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclAllGather(send, recv, n, ncclFloat32, state_->comm, state_->stream),
            "ncclAllGather");
  ComputeAfter();
}

void NcclCommunicator::ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclReduceScatter(send, recv, n, ncclFloat32, ToNccl(op), state_->comm, state_->stream),
            "ncclReduceScatter");
  ComputeAfter();
}

void NcclCommunicator::Broadcast(void* data, size_t bytes, int root) {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclBroadcast(data, data, bytes, ncclUint8, root, state_->comm, state_->stream),
            "ncclBroadcast");
  ComputeAfter();
}

// NCCL matches point-to-point messages in order per peer; tags are not needed (the schedules
// keep the per-channel order, see parallel/pipeline). Sends and receives are held and queued in
// one NCCL group by PostHeld.
void NcclCommunicator::Send(const void* data, size_t bytes, int peer, int tag) {
  ISend(data, bytes, peer, tag)->Wait();
}

void NcclCommunicator::Recv(void* data, size_t bytes, int peer, int tag) {
  IRecv(data, bytes, peer, tag)->Wait();
}

std::unique_ptr<Request> NcclCommunicator::ISend(const void* data, size_t bytes, int peer,
                                                 int /*tag*/) {
  auto op = std::make_shared<HeldOp>();
  op->send = true;
  op->data = const_cast<void*>(data);
  op->bytes = bytes;
  op->peer = peer;
  state_->held.push_back(op);
  return std::make_unique<HeldRequest>(this, std::move(op));
}

std::unique_ptr<Request> NcclCommunicator::IRecv(void* data, size_t bytes, int peer, int /*tag*/) {
  auto op = std::make_shared<HeldOp>();
  op->data = data;
  op->bytes = bytes;
  op->peer = peer;
  state_->held.push_back(op);
  return std::make_unique<HeldRequest>(this, std::move(op));
}

void NcclCommunicator::PostHeld() {
  if (state_->held.empty()) return;
  AfterCompute();
  CheckNccl(ncclGroupStart(), "ncclGroupStart");
  for (const auto& op : state_->held) {
    if (op->send) {
      CheckNccl(ncclSend(op->data, op->bytes, ncclUint8, op->peer, state_->comm, state_->stream),
                "ncclSend");
    } else {
      CheckNccl(ncclRecv(op->data, op->bytes, ncclUint8, op->peer, state_->comm, state_->stream),
                "ncclRecv");
    }
  }
  CheckNccl(ncclGroupEnd(), "ncclGroupEnd");
  auto group = std::make_shared<GroupEvent>();
  CheckCuda(cudaEventCreateWithFlags(&group->event, cudaEventDisableTiming), "cudaEventCreate");
  CheckCuda(cudaEventRecord(group->event, state_->stream), "cudaEventRecord");
  for (const auto& op : state_->held) op->done_event = group;
  state_->held.clear();
}

void NcclCommunicator::Barrier() {
  PostHeld();
  AfterCompute();
  CheckNccl(ncclAllReduce(state_->barrier_word, state_->barrier_word, 1, ncclFloat32, ncclSum,
                          state_->comm, state_->stream),
            "ncclAllReduce (barrier)");
  Sync();
}

std::unique_ptr<Communicator> NcclCommunicator::Subgroup(const std::vector<int>& ranks) {
  int color = -1, key = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] == rank_) key = static_cast<int>(i);
    if (color < 0 || ranks[i] < color) color = ranks[i];
  }
  if (key < 0) AbortAllRanks(absl::StrCat("rank ", rank_, " is not in its own subgroup"));
  PostHeld();
  auto state = NewState();
  CheckNccl(ncclCommSplit(state_->comm, color, key, &state->comm, nullptr), "ncclCommSplit");
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(state), key, static_cast<int>(ranks.size())));
}

void UseNcclForModelParallel(ParallelContext* ctx, Communicator* host_world) {
  auto nccl_group = [&](const std::vector<int>& ranks) {
    std::unique_ptr<Communicator> bootstrap = host_world->Subgroup(ranks);
    return NcclCommunicator::Create(bootstrap.get());
  };
  // Every rank creates its tensor-, data- and pipeline-parallel groups, in that order
  // (collective).
  ctx->tp = nccl_group(ctx->grid.TpGroup(ctx->rank));
  ctx->dp = nccl_group(ctx->grid.DpGroup(ctx->rank));
  ctx->pp = nccl_group(ctx->grid.PpGroup(ctx->rank));
}

}  // namespace eellm
