#include "parallel/comm/mpi_communicator.h"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/backend.h"
#include "parallel/comm/mpi_runtime.h"

namespace eellm {
namespace {

std::atomic<size_t> g_max_count{static_cast<size_t>(INT_MAX)};

size_t MaxCount() { return g_max_count.load(std::memory_order_relaxed); }

int WorldRank() {
  int r = -1;
  if (MpiRuntime::Active()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

std::string ErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return absl::StrCat("MPI error ", code);
  return std::string(text, len);
}

// Aborts the job when an MPI call failed; `what` names the operation and its arguments.
void Check(int rc, const std::string& what) {
  if (rc == MPI_SUCCESS) return;
  AbortAllRanks(
      absl::StrCat("MPI ", what, " failed on world rank ", WorldRank(), ": ", ErrorString(rc)));
}

MPI_Op ToMpi(ReduceOp op) { return op == ReduceOp::kMax ? MPI_MAX : MPI_SUM; }

// Whether `backend`'s buffers must be staged through host memory.
bool NeedsStaging(Backend* backend) {
  return backend != nullptr && backend->device() != Device::kCpu;
}

}  // namespace

struct MpiCommunicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  Backend* backend = nullptr;
  bool staged = false;
  std::vector<char> stage_a, stage_b;  // host staging for blocking operations

  std::string Where() const { return absl::StrCat("(rank ", rank, " of ", size, ")"); }

  // Host staging buffer of at least `bytes`.
  static void* Grow(std::vector<char>& v, size_t bytes) {
    if (v.size() < bytes) v.resize(bytes);
    return v.data();
  }
};

namespace {

// Builds an Impl around `comm` (which it then owns), with MPI_ERRORS_RETURN set.
std::unique_ptr<MpiCommunicator::Impl> MakeImpl(MPI_Comm comm, Backend* backend) {
  auto impl = std::make_unique<MpiCommunicator::Impl>();
  impl->comm = comm;
  impl->backend = backend;
  impl->staged = NeedsStaging(backend);
  Check(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), "Comm_set_errhandler");
  Check(MPI_Comm_rank(comm, &impl->rank), "Comm_rank");
  Check(MPI_Comm_size(comm, &impl->size), "Comm_size");
  return impl;
}

// Pending non-blocking operation: one MPI request per chunk, and for staged buffers the host
// copy, copied back to the device buffer on completion (receives and all-reduces).
class MpiRequest final : public Request {
 public:
  MpiRequest(std::string what, Backend* backend) : what_(std::move(what)), backend_(backend) {}
  ~MpiRequest() override {
    if (!done_ && MpiRuntime::Active()) Wait();
  }

  void Wait() override {
    if (done_) return;
    std::vector<MPI_Status> statuses(reqs_.size());
    Finish(MPI_Waitall(static_cast<int>(reqs_.size()), reqs_.data(), statuses.data()), statuses);
  }

  bool Test() override {
    if (done_) return true;
    std::vector<MPI_Status> statuses(reqs_.size());
    int flag = 0;
    const int rc =
        MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, statuses.data());
    if (rc != MPI_SUCCESS || flag) Finish(rc, statuses);
    return done_;
  }

  std::vector<MPI_Request> reqs_;
  std::vector<size_t> expected_bytes_;  // receives: the size each chunk must have
  std::vector<char> host_;              // staged data
  void* copy_back_dst_ = nullptr;       // device buffer to fill from host_ on completion

 private:
  // Completion: checks the statuses and message sizes, and copies staged receives back.
  void Finish(int rc, std::vector<MPI_Status>& statuses) {
    done_ = true;
    if (rc == MPI_ERR_IN_STATUS) {
      for (const MPI_Status& s : statuses) {
        if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) rc = s.MPI_ERROR;
      }
    }
    Check(rc, what_);
    for (size_t i = 0; i < expected_bytes_.size(); ++i) {
      int got = 0;
      Check(MPI_Get_count(&statuses[i], MPI_BYTE, &got), "Get_count");
      if (static_cast<size_t>(got) != expected_bytes_[i]) {
        AbortAllRanks(absl::StrCat(what_, ": expected a message of ", expected_bytes_[i],
                                   " bytes, got ", got, " (sender and receiver disagree)"));
      }
    }
    if (copy_back_dst_ != nullptr) {
      backend_->CopyFromHost(copy_back_dst_, host_.data(), host_.size());
    }
  }

  std::string what_;
  Backend* backend_;
  bool done_ = false;
};

}  // namespace

MpiCommunicator::MpiCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MpiCommunicator::~MpiCommunicator() {
  if (impl_->comm != MPI_COMM_NULL && MpiRuntime::Active()) MPI_Comm_free(&impl_->comm);
}

std::unique_ptr<Communicator> MpiCommunicator::World(Backend* backend) {
  if (!MpiRuntime::Active()) {
    AbortAllRanks("MpiCommunicator::World: MPI is not initialised (create an MpiRuntime first)");
  }
  MPI_Comm comm;
  Check(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "Comm_dup(MPI_COMM_WORLD)");
  return std::unique_ptr<Communicator>(new MpiCommunicator(MakeImpl(comm, backend)));
}

size_t MpiCommunicator::SetMaxCountForTesting(size_t count) {
  count = std::min(std::max<size_t>(count, 1), static_cast<size_t>(INT_MAX));
  return g_max_count.exchange(count);
}

int MpiCommunicator::rank() const { return impl_->rank; }
int MpiCommunicator::size() const { return impl_->size; }

void MpiCommunicator::AllReduce(float* data, size_t n, ReduceOp op) {
  if (n == 0) return;
  float* buf = data;
  if (impl_->staged) {
    buf = static_cast<float*>(Impl::Grow(impl_->stage_a, n * sizeof(float)));
    impl_->backend->CopyToHost(buf, data, n * sizeof(float));
  }
  const size_t max = MaxCount();
  for (size_t off = 0; off < n; off += max) {
    const int len = static_cast<int>(std::min(max, n - off));
    Check(MPI_Allreduce(MPI_IN_PLACE, buf + off, len, MPI_FLOAT, ToMpi(op), impl_->comm),
          absl::StrCat("Allreduce of ", n, " floats ", impl_->Where()));
  }
  if (impl_->staged) impl_->backend->CopyFromHost(data, buf, n * sizeof(float));
}

void MpiCommunicator::AllGather(const float* send, float* recv, size_t n) {
  if (n == 0) return;
  const size_t total = n * impl_->size;
  const bool in_place = send == recv + static_cast<size_t>(impl_->rank) * n;
  const float* s = send;
  float* r = recv;
  if (impl_->staged) {
    r = static_cast<float*>(Impl::Grow(impl_->stage_a, total * sizeof(float)));
    if (in_place) {
      impl_->backend->CopyToHost(r + static_cast<size_t>(impl_->rank) * n, send, n * sizeof(float));
    } else {
      float* hs = static_cast<float*>(Impl::Grow(impl_->stage_b, n * sizeof(float)));
      impl_->backend->CopyToHost(hs, send, n * sizeof(float));
      s = hs;
    }
  }
  const std::string what = absl::StrCat("Allgather of ", n, " floats ", impl_->Where());
  const size_t max = MaxCount();
  if (n <= max) {
    Check(MPI_Allgather(in_place ? MPI_IN_PLACE : s, static_cast<int>(n), MPI_FLOAT, r,
                        static_cast<int>(n), MPI_FLOAT, impl_->comm),
          what);
  } else {
    // Chunk [off, off + len) of every rank's block: a receive type of `len` floats whose
    // extent is a whole block, so rank q's chunk lands at r + q * n + off.
    for (size_t off = 0; off < n; off += max) {
      const int len = static_cast<int>(std::min(max, n - off));
      MPI_Datatype run, block;
      Check(MPI_Type_contiguous(len, MPI_FLOAT, &run), what);
      Check(MPI_Type_create_resized(run, 0, static_cast<MPI_Aint>(n * sizeof(float)), &block),
            what);
      Check(MPI_Type_commit(&block), what);
      Check(MPI_Allgather(in_place ? MPI_IN_PLACE : s + off, len, MPI_FLOAT, r + off, 1, block,
                          impl_->comm),
            what);
      MPI_Type_free(&block);
      MPI_Type_free(&run);
    }
  }
  if (impl_->staged) impl_->backend->CopyFromHost(recv, r, total * sizeof(float));
}

void MpiCommunicator::ReduceScatter(const float* send, float* recv, size_t n, ReduceOp op) {
  if (n == 0) return;
  const size_t total = n * impl_->size;
  const float* s = send;
  float* r = recv;
  if (impl_->staged) {
    float* hs = static_cast<float*>(Impl::Grow(impl_->stage_a, total * sizeof(float)));
    impl_->backend->CopyToHost(hs, send, total * sizeof(float));
    s = hs;
    r = static_cast<float*>(Impl::Grow(impl_->stage_b, n * sizeof(float)));
  }
  const std::string what = absl::StrCat("Reduce_scatter_block of ", n, " floats ", impl_->Where());
  const size_t max = MaxCount();
  if (n <= max) {
    Check(MPI_Reduce_scatter_block(s, r, static_cast<int>(n), MPI_FLOAT, ToMpi(op), impl_->comm),
          what);
  } else {
    // Huge blocks: one reduction per destination rank and chunk (only basic datatypes, which
    // every MPI reduces correctly).
    for (int q = 0; q < impl_->size; ++q) {
      for (size_t off = 0; off < n; off += max) {
        const int len = static_cast<int>(std::min(max, n - off));
        const float* src = s + static_cast<size_t>(q) * n + off;
        Check(MPI_Reduce(src, q == impl_->rank ? r + off : nullptr, len, MPI_FLOAT, ToMpi(op), q,
                         impl_->comm),
              what);
      }
    }
  }
  if (impl_->staged) impl_->backend->CopyFromHost(recv, r, n * sizeof(float));
}

void MpiCommunicator::Broadcast(void* data, size_t bytes, int root) {
  if (bytes == 0) return;
  if (root < 0 || root >= impl_->size) {
    AbortAllRanks(absl::StrCat("Broadcast: root ", root, " is not a rank of this communicator ",
                               impl_->Where()));
  }
  char* buf = static_cast<char*>(data);
  if (impl_->staged) {
    buf = static_cast<char*>(Impl::Grow(impl_->stage_a, bytes));
    if (impl_->rank == root) impl_->backend->CopyToHost(buf, data, bytes);
  }
  const size_t max = MaxCount();
  for (size_t off = 0; off < bytes; off += max) {
    const int len = static_cast<int>(std::min(max, bytes - off));
    Check(MPI_Bcast(buf + off, len, MPI_BYTE, root, impl_->comm),
          absl::StrCat("Bcast of ", bytes, " bytes from root ", root, " ", impl_->Where()));
  }
  if (impl_->staged && impl_->rank != root) impl_->backend->CopyFromHost(data, buf, bytes);
}

void MpiCommunicator::Send(const void* data, size_t bytes, int peer, int tag) {
  const char* buf = static_cast<const char*>(data);
  if (impl_->staged && bytes > 0) {
    char* h = static_cast<char*>(Impl::Grow(impl_->stage_a, bytes));
    impl_->backend->CopyToHost(h, data, bytes);
    buf = h;
  }
  const std::string what =
      absl::StrCat("Send of ", bytes, " bytes to peer ", peer, " tag ", tag, " ", impl_->Where());
  const size_t max = MaxCount();
  size_t off = 0;
  do {  // a zero-byte message is still a message
    const int len = static_cast<int>(std::min(max, bytes - off));
    Check(MPI_Send(buf + off, len, MPI_BYTE, peer, tag, impl_->comm), what);
    off += len;
  } while (off < bytes);
}

void MpiCommunicator::Recv(void* data, size_t bytes, int peer, int tag) {
  char* buf = static_cast<char*>(data);
  if (impl_->staged && bytes > 0) buf = static_cast<char*>(Impl::Grow(impl_->stage_a, bytes));
  const std::string what =
      absl::StrCat("Recv of ", bytes, " bytes from peer ", peer, " tag ", tag, " ", impl_->Where());
  const size_t max = MaxCount();
  size_t off = 0;
  do {
    const int len = static_cast<int>(std::min(max, bytes - off));
    MPI_Status status;
    Check(MPI_Recv(buf + off, len, MPI_BYTE, peer, tag, impl_->comm, &status), what);
    int got = 0;
    Check(MPI_Get_count(&status, MPI_BYTE, &got), "Get_count");
    if (got != len) {
      AbortAllRanks(absl::StrCat(what, ": expected a message of ", len, " bytes, got ", got,
                                 " (sender and receiver disagree)"));
    }
    off += len;
  } while (off < bytes);
  if (impl_->staged && bytes > 0) impl_->backend->CopyFromHost(data, buf, bytes);
}

std::unique_ptr<Request> MpiCommunicator::ISend(const void* data, size_t bytes, int peer, int tag) {
  const std::string what =
      absl::StrCat("Isend of ", bytes, " bytes to peer ", peer, " tag ", tag, " ", impl_->Where());
  auto req = std::make_unique<MpiRequest>(what, impl_->backend);
  const char* buf = static_cast<const char*>(data);
  if (impl_->staged && bytes > 0) {
    req->host_.resize(bytes);
    impl_->backend->CopyToHost(req->host_.data(), data, bytes);
    buf = req->host_.data();
  }
  const size_t max = MaxCount();
  size_t off = 0;
  do {
    const int len = static_cast<int>(std::min(max, bytes - off));
    req->reqs_.emplace_back();
    Check(MPI_Isend(buf + off, len, MPI_BYTE, peer, tag, impl_->comm, &req->reqs_.back()), what);
    off += len;
  } while (off < bytes);
  return req;
}

std::unique_ptr<Request> MpiCommunicator::IRecv(void* data, size_t bytes, int peer, int tag) {
  const std::string what = absl::StrCat("Irecv of ", bytes, " bytes from peer ", peer, " tag ", tag,
                                        " ", impl_->Where());
  auto req = std::make_unique<MpiRequest>(what, impl_->backend);
  char* buf = static_cast<char*>(data);
  if (impl_->staged && bytes > 0) {
    req->host_.resize(bytes);
    buf = req->host_.data();
    req->copy_back_dst_ = data;
  }
  const size_t max = MaxCount();
  size_t off = 0;
  do {
    const int len = static_cast<int>(std::min(max, bytes - off));
    req->reqs_.emplace_back();
    req->expected_bytes_.push_back(len);
    Check(MPI_Irecv(buf + off, len, MPI_BYTE, peer, tag, impl_->comm, &req->reqs_.back()), what);
    off += len;
  } while (off < bytes);
  return req;
}

std::unique_ptr<Request> MpiCommunicator::IAllReduce(float* data, size_t n, ReduceOp op) {
  const std::string what = absl::StrCat("Iallreduce of ", n, " floats ", impl_->Where());
  auto req = std::make_unique<MpiRequest>(what, impl_->backend);
  if (n == 0) return req;
  float* buf = data;
  if (impl_->staged) {
    req->host_.resize(n * sizeof(float));
    impl_->backend->CopyToHost(req->host_.data(), data, n * sizeof(float));
    buf = reinterpret_cast<float*>(req->host_.data());
    req->copy_back_dst_ = data;
  }
  const size_t max = MaxCount();
  for (size_t off = 0; off < n; off += max) {
    const int len = static_cast<int>(std::min(max, n - off));
    req->reqs_.emplace_back();
    Check(MPI_Iallreduce(MPI_IN_PLACE, buf + off, len, MPI_FLOAT, ToMpi(op), impl_->comm,
                         &req->reqs_.back()),
          what);
  }
  return req;
}

void MpiCommunicator::Barrier() {
  Check(MPI_Barrier(impl_->comm), absl::StrCat("Barrier ", impl_->Where()));
}

std::unique_ptr<Communicator> MpiCommunicator::Subgroup(const std::vector<int>& ranks) {
  const std::string list = absl::StrCat("[", absl::StrJoin(ranks, ", "), "]");
  int key = -1;
  std::vector<bool> seen(impl_->size, false);
  for (size_t i = 0; i < ranks.size(); ++i) {
    const int q = ranks[i];
    if (q < 0 || q >= impl_->size || seen[q]) {
      AbortAllRanks(absl::StrCat("Subgroup ", list, ": rank ", q, " is out of range or repeated ",
                                 impl_->Where()));
    }
    seen[q] = true;
    if (q == impl_->rank) key = static_cast<int>(i);
  }
  if (key < 0) {
    AbortAllRanks(absl::StrCat("Subgroup ", list, " does not contain this rank ", impl_->Where()));
  }
  const int color = *std::min_element(ranks.begin(), ranks.end());
  MPI_Comm comm;
  Check(MPI_Comm_split(impl_->comm, color, key, &comm),
        absl::StrCat("Comm_split for group ", list, " ", impl_->Where()));
  std::unique_ptr<Communicator> sub(new MpiCommunicator(MakeImpl(comm, impl_->backend)));

  // The group MPI formed holds every rank that named the same smallest rank; it is `ranks` only
  // if all members passed the same list. Check, so that a wrong grouping fails loudly here
  // instead of deadlocking or mixing data later.
  const int k = sub->size();
  std::vector<int> formed(k), index(k);
  for (int i = 0; i < k; ++i) index[i] = i;
  MPI_Group sub_group, parent_group;
  Check(MPI_Comm_group(comm, &sub_group), "Comm_group");
  Check(MPI_Comm_group(impl_->comm, &parent_group), "Comm_group");
  Check(MPI_Group_translate_ranks(sub_group, k, index.data(), parent_group, formed.data()),
        "Group_translate_ranks");
  MPI_Group_free(&sub_group);
  MPI_Group_free(&parent_group);
  if (formed != ranks) {
    AbortAllRanks(absl::StrCat("Subgroup ", list, " ", impl_->Where(), ": MPI formed the group [",
                               absl::StrJoin(formed, ", "),
                               "]; every member must pass the same list of ranks"));
  }
  return sub;
}

}  // namespace eellm
