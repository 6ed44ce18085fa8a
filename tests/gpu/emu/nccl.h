// Shim for the CUDA emulation in tests: the NCCL calls of parallel/comm/nccl_communicator.cc
// over MPI on the emulated (host) device memory. Faithful where it costs little: point-to-point
// messages match in order per peer pair whatever the caller meant by tags (NCCL has none), and a
// send does not complete before its receive is posted (MPI_Ssend), so a schedule that would
// deadlock NCCL deadlocks here too. ncclCommInitRank splits MPI_COMM_WORLD by the unique id: all
// world ranks must create their communicators together (as eellm does: every rank its own tp,
// then its own dp group). Every call communicates before it returns, except inside
// ncclGroupStart/End, where sends and receives are collected and then run together (receives
// posted first, sends synchronous, all awaited), as NCCL progresses a group's operations
// concurrently. Streams order what an operation reads and when its results are seen: it reads
// after the work its stream is ordered after (CompleteWorkFor), and its results land in their
// destination only as late as the stream's order allows (DeferLanding in cuda_emulation.h).
// Then what it read must be unchanged: a write to it before then raced with the operation, which
// on a GPU may read as late as it completes (CheckUnchanged aborts).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cuda_emulation.h"

enum ncclResult_t { ncclSuccess = 0, ncclInvalidArgument = 4, ncclSystemError = 2 };
enum ncclDataType_t { ncclUint8 = 1, ncclFloat32 = 7 };
enum ncclRedOp_t { ncclSum = 0, ncclMax = 2 };
struct ncclUniqueId {
  char internal[128];
};
struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;
};
using ncclComm_t = ncclComm*;
struct ncclConfig_t;

inline const char* ncclGetErrorString(ncclResult_t r) {
  return r == ncclSuccess ? "no error (emulated)" : "error (emulated NCCL)";
}

namespace eellm_emu {
inline MPI_Datatype Mpi(ncclDataType_t t) { return t == ncclFloat32 ? MPI_FLOAT : MPI_BYTE; }
inline MPI_Op Mpi(ncclRedOp_t op) { return op == ncclSum ? MPI_SUM : MPI_MAX; }
inline size_t Bytes(ncclDataType_t t) { return t == ncclFloat32 ? 4 : 1; }
inline ncclResult_t Check(int mpi_result) {
  return mpi_result == MPI_SUCCESS ? ncclSuccess : ncclSystemError;
}
// (Every operation calls it first, with its stream: the deferred work that stream is ordered
// after completes before it reads; see CompleteWorkFor.)
inline bool DeviceBuffer(const void* p, size_t count, ncclDataType_t t, cudaStream_t s) {
  CompleteWorkFor(s);
  if (count == 0 || IsDevice(p, count * Bytes(t))) return true;
  Misuse("an NCCL buffer is not device memory");
  return false;
}
// The bytes of [p, p + bytes): an operation's result is computed there and lands in its
// destination later (DeferLanding, as late as the stream's order allows).
using Shadow = std::shared_ptr<std::vector<unsigned char>>;
inline Shadow ShadowOf(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  return std::make_shared<std::vector<unsigned char>>(b, b + bytes);
}
// What an operation reads, and its bytes when the operation was issued. On a GPU the operation
// may read them as late as it completes, so a write to them that is not ordered after it races
// with it. The emulation reads at the issue; it checks instead, when the results land, that the
// bytes are still those (and aborts, naming the operation, when they are not).
struct Read {
  const char* op = nullptr;
  const void* p = nullptr;
  Shadow before;
};
inline Read Reading(const char* op, const void* p, size_t bytes) {
  return {op, p, ShadowOf(p, bytes)};
}
inline void CheckUnchanged(const Read& r) {
  if (r.p == nullptr || r.before->empty() ||
      std::memcmp(r.p, r.before->data(), r.before->size()) == 0) {
    return;
  }
  std::fprintf(stderr,
               "CUDA emulation: what %s reads was written while it was in flight (a write not "
               "ordered after it: it may read the new bytes on a GPU)\n",
               r.op);
  std::abort();
}
// The result lands in dst (null: none, a send) after the check of what the operation read.
inline void LandLater(cudaStream_t s, const Read& read, void* dst, Shadow result) {
  DeferLanding(s, [read, dst, result] {
    CheckUnchanged(read);
    if (dst != nullptr && !result->empty()) std::memmove(dst, result->data(), result->size());
  });
}
}  // namespace eellm_emu

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::random_device rd;
  for (char& c : id->internal) c = static_cast<char>(rd());
  return ncclSuccess;
}
inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  uint32_t color = 2166136261u;
  for (char c : id.internal) color = (color ^ static_cast<unsigned char>(c)) * 16777619u;
  auto* c = new ncclComm;
  if (MPI_Comm_split(MPI_COMM_WORLD, static_cast<int>(color & 0x7fffffff), rank, &c->mpi) !=
      MPI_SUCCESS) {
    return ncclSystemError;
  }
  int size = 0;
  MPI_Comm_size(c->mpi, &size);
  if (size != nranks) return ncclInvalidArgument;
  *comm = c;
  return ncclSuccess;
}
inline ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* out,
                                  ncclConfig_t*) {
  auto* c = new ncclComm;
  if (MPI_Comm_split(comm->mpi, color, key, &c->mpi) != MPI_SUCCESS) return ncclSystemError;
  *out = c;
  return ncclSuccess;
}
inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm->mpi);
  delete comm;
  return ncclSuccess;
}
inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t t,
                                  ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
  if (!eellm_emu::DeviceBuffer(send, count, t, s) || !eellm_emu::DeviceBuffer(recv, count, t, s)) {
    return ncclInvalidArgument;
  }
  const size_t bytes = count * eellm_emu::Bytes(t);
  const eellm_emu::Read read = eellm_emu::Reading("ncclAllReduce", send, bytes);
  const eellm_emu::Shadow r = eellm_emu::ShadowOf(send, bytes);
  const ncclResult_t e =
      eellm_emu::Check(MPI_Allreduce(MPI_IN_PLACE, r->data(), static_cast<int>(count),
                                     eellm_emu::Mpi(t), eellm_emu::Mpi(op), comm->mpi));
  eellm_emu::LandLater(s, read, recv, r);
  return e;
}
inline ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t t,
                                  ncclComm_t comm, cudaStream_t s) {
  int size = 0;
  MPI_Comm_size(comm->mpi, &size);
  if (!eellm_emu::DeviceBuffer(send, count, t, s) ||
      !eellm_emu::DeviceBuffer(recv, count * size, t, s)) {
    return ncclInvalidArgument;
  }
  const eellm_emu::Read read =
      eellm_emu::Reading("ncclAllGather", send, count * eellm_emu::Bytes(t));
  const eellm_emu::Shadow r = eellm_emu::ShadowOf(recv, count * size * eellm_emu::Bytes(t));
  const ncclResult_t e =
      eellm_emu::Check(MPI_Allgather(send, static_cast<int>(count), eellm_emu::Mpi(t), r->data(),
                                     static_cast<int>(count), eellm_emu::Mpi(t), comm->mpi));
  eellm_emu::LandLater(s, read, recv, r);
  return e;
}
inline ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, ncclDataType_t t,
                                      ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
  int size = 0;
  MPI_Comm_size(comm->mpi, &size);
  if (!eellm_emu::DeviceBuffer(send, count * size, t, s) ||
      !eellm_emu::DeviceBuffer(recv, count, t, s)) {
    return ncclInvalidArgument;
  }
  const eellm_emu::Read read =
      eellm_emu::Reading("ncclReduceScatter", send, count * size * eellm_emu::Bytes(t));
  const eellm_emu::Shadow r = eellm_emu::ShadowOf(recv, count * eellm_emu::Bytes(t));
  const ncclResult_t e = eellm_emu::Check(MPI_Reduce_scatter_block(
      send, r->data(), static_cast<int>(count), eellm_emu::Mpi(t), eellm_emu::Mpi(op), comm->mpi));
  eellm_emu::LandLater(s, read, recv, r);
  return e;
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t t,
                                  int root, ncclComm_t comm, cudaStream_t s) {
  if (!eellm_emu::DeviceBuffer(recv, count, t, s)) return ncclInvalidArgument;
  int rank = 0;
  MPI_Comm_rank(comm->mpi, &rank);
  if (rank == root && !eellm_emu::DeviceBuffer(send, count, t, s)) return ncclInvalidArgument;
  const size_t bytes = count * eellm_emu::Bytes(t);
  const eellm_emu::Read read =
      rank == root ? eellm_emu::Reading("ncclBroadcast", send, bytes) : eellm_emu::Read{};
  const eellm_emu::Shadow r = eellm_emu::ShadowOf(rank == root ? send : recv, bytes);
  const ncclResult_t e = eellm_emu::Check(
      MPI_Bcast(r->data(), static_cast<int>(count), eellm_emu::Mpi(t), root, comm->mpi));
  eellm_emu::LandLater(s, read, recv, r);
  return e;
}
namespace eellm_emu {
struct P2p {
  bool send;
  void* data;
  int count;
  MPI_Datatype type;
  int peer;
  MPI_Comm comm;
  cudaStream_t stream;
  Shadow received;  // a receive's bytes, landing in `data` later
  Read read;        // a send's
};
inline int g_group_depth = 0;
inline std::vector<P2p> g_group;
}  // namespace eellm_emu

inline ncclResult_t ncclGroupStart() {
  ++eellm_emu::g_group_depth;
  return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
  if (eellm_emu::g_group_depth <= 0) return ncclInvalidArgument;
  if (--eellm_emu::g_group_depth > 0) return ncclSuccess;
  std::vector<MPI_Request> reqs;
  for (bool sends : {false, true}) {
    for (eellm_emu::P2p& op : eellm_emu::g_group) {
      if (op.send != sends) continue;
      reqs.emplace_back();
      int r = MPI_SUCCESS;
      int type_bytes = 0;
      MPI_Type_size(op.type, &type_bytes);
      const size_t bytes = static_cast<size_t>(op.count) * type_bytes;
      if (op.send) {
        op.read = eellm_emu::Reading("ncclSend", op.data, bytes);
        r = MPI_Issend(op.data, op.count, op.type, op.peer, 0, op.comm, &reqs.back());
      } else {
        op.received = eellm_emu::ShadowOf(op.data, bytes);
        r = MPI_Irecv(op.received->data(), op.count, op.type, op.peer, 0, op.comm, &reqs.back());
      }
      if (r != MPI_SUCCESS) {
        eellm_emu::g_group.clear();
        return ncclSystemError;
      }
    }
  }
  const ncclResult_t e = eellm_emu::Check(
      MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
  for (const eellm_emu::P2p& op : eellm_emu::g_group) {
    eellm_emu::LandLater(op.stream, op.read, op.send ? nullptr : op.data, op.received);
  }
  eellm_emu::g_group.clear();
  return e;
}
inline ncclResult_t ncclSend(const void* data, size_t count, ncclDataType_t t, int peer,
                             ncclComm_t comm, cudaStream_t s) {
  if (!eellm_emu::DeviceBuffer(data, count, t, s)) return ncclInvalidArgument;
  if (eellm_emu::g_group_depth > 0) {
    eellm_emu::g_group.push_back({true,
                                  const_cast<void*>(data),
                                  static_cast<int>(count),
                                  eellm_emu::Mpi(t),
                                  peer,
                                  comm->mpi,
                                  s,
                                  nullptr,
                                  {}});
    return ncclSuccess;
  }
  const eellm_emu::Read read = eellm_emu::Reading("ncclSend", data, count * eellm_emu::Bytes(t));
  const ncclResult_t e = eellm_emu::Check(
      MPI_Ssend(data, static_cast<int>(count), eellm_emu::Mpi(t), peer, 0, comm->mpi));
  eellm_emu::LandLater(s, read, nullptr, nullptr);
  return e;
}
inline ncclResult_t ncclRecv(void* data, size_t count, ncclDataType_t t, int peer, ncclComm_t comm,
                             cudaStream_t s) {
  if (!eellm_emu::DeviceBuffer(data, count, t, s)) return ncclInvalidArgument;
  if (eellm_emu::g_group_depth > 0) {
    eellm_emu::g_group.push_back(
        {false, data, static_cast<int>(count), eellm_emu::Mpi(t), peer, comm->mpi, s, nullptr, {}});
    return ncclSuccess;
  }
  const eellm_emu::Shadow r = eellm_emu::ShadowOf(data, count * eellm_emu::Bytes(t));
  const ncclResult_t e =
      eellm_emu::Check(MPI_Recv(r->data(), static_cast<int>(count), eellm_emu::Mpi(t), peer, 0,
                                comm->mpi, MPI_STATUS_IGNORE));
  eellm_emu::LandLater(s, eellm_emu::Read{}, data, r);
  return e;
}
