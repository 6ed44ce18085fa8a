// Conformance suite of the Communicator contract, run on every implementation available: the
// SelfCommunicator (one rank, no MPI) and the MpiCommunicator on the world and on subgroups
// (all ranks reversed, and the even / odd ranks in descending order), each on host memory
// (null backend), the CPU backend and a fake device backend whose buffers must be staged.
// Runs under mpirun with any number of ranks (ctest: 1, 2, 4, 8). Every rank runs the same
// tests in the same order; checks use EXPECT (not ASSERT) inside collective sequences so that
// a failing rank keeps calling the same collectives as the others.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/comm/self_communicator.h"
#include "tests/parallel/fake_device_backend.h"
#include "tests/parallel/mpi_test_util.h"

namespace eellm {
namespace {

using testing::DevBuf;
using testing::World;

// Reports the first mismatch (values are small integers in float: exact).
template <class T>
void ExpectSame(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      ADD_FAILURE() << what << ": element " << i << " is " << +got[i] << ", expected " << +want[i];
      return;
    }
  }
}

// ---- the checks, each collective over `c` ---------------------------------------------------

void CheckAllReduceSum(Communicator& c, Backend* be, size_t n) {
  const int r = c.rank(), s = c.size();
  std::vector<float> v(n), want(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = (r + 1) * 1000.0f + i;
    want[i] = 1000.0f * s * (s + 1) / 2 + static_cast<float>(i) * s;
  }
  DevBuf b(be, n * sizeof(float));
  b.Put(v);
  c.AllReduce(b.f32(), n, ReduceOp::kSum);
  ExpectSame(b.Get<float>(n), want, absl::StrCat("AllReduce sum n=", n));
}

void CheckAllReduceMax(Communicator& c, Backend* be, size_t n) {
  const int r = c.rank(), s = c.size();
  std::vector<float> v(n), want(n);
  for (size_t i = 0; i < n; ++i) {
    // Every third element is largest on rank 0, the others on the last rank.
    v[i] = (i % 3 == 0 ? -10.0f * r : 10.0f * r) + i;
    want[i] = (i % 3 == 0 ? 0.0f : 10.0f * (s - 1)) + i;
  }
  DevBuf b(be, n * sizeof(float));
  b.Put(v);
  c.AllReduce(b.f32(), n, ReduceOp::kMax);
  ExpectSame(b.Get<float>(n), want, absl::StrCat("AllReduce max n=", n));
}

void CheckIAllReduce(Communicator& c, Backend* be, size_t n) {
  const int r = c.rank(), s = c.size();
  // Three reductions in flight at once, waited for in reverse order; the third request is
  // destroyed without Wait (its destructor waits).
  std::vector<float> a(n), m(n), z(n), want_a(n), want_m(n), want_z(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = r + 1.0f + i;
    want_a[i] = s * (s + 1) / 2.0f + static_cast<float>(i) * s;
    m[i] = (i % 2 ? r : -r) * 2.0f;
    want_m[i] = i % 2 ? 2.0f * (s - 1) : 0.0f;
    z[i] = 3.0f * r;
    want_z[i] = 3.0f * s * (s - 1) / 2;
  }
  DevBuf ba(be, n * sizeof(float)), bm(be, n * sizeof(float)), bz(be, n * sizeof(float));
  ba.Put(a);
  bm.Put(m);
  bz.Put(z);
  auto ra = c.IAllReduce(ba.f32(), n, ReduceOp::kSum);
  auto rm = c.IAllReduce(bm.f32(), n, ReduceOp::kMax);
  auto rz = c.IAllReduce(bz.f32(), n, ReduceOp::kSum);
  rm->Wait();
  ra->Wait();
  ra->Wait();  // a second Wait does nothing
  rz.reset();
  ExpectSame(ba.Get<float>(n), want_a, absl::StrCat("IAllReduce sum n=", n));
  ExpectSame(bm.Get<float>(n), want_m, absl::StrCat("IAllReduce max n=", n));
  ExpectSame(bz.Get<float>(n), want_z, absl::StrCat("IAllReduce (destroyed unwaited) n=", n));
}

void CheckAllGather(Communicator& c, Backend* be, size_t n) {
  const int r = c.rank(), s = c.size();
  std::vector<float> send(n), want(s * n), junk(s * n, -1.0f);
  for (size_t i = 0; i < n; ++i) send[i] = r * 10000.0f + i;
  for (int q = 0; q < s; ++q) {
    for (size_t i = 0; i < n; ++i) want[q * n + i] = q * 10000.0f + i;
  }
  DevBuf bs(be, n * sizeof(float)), br(be, s * n * sizeof(float));
  bs.Put(send);
  br.Put(junk);
  c.AllGather(bs.f32(), br.f32(), n);
  ExpectSame(br.Get<float>(s * n), want, absl::StrCat("AllGather n=", n));
  ExpectSame(bs.Get<float>(n), send, "AllGather leaves send unchanged");

  // In place: this rank's block already sits in recv.
  br.Put(junk);
  br.Put(send, r * n);
  c.AllGather(br.f32() + r * n, br.f32(), n);
  ExpectSame(br.Get<float>(s * n), want, absl::StrCat("AllGather in place n=", n));
}

void CheckReduceScatter(Communicator& c, Backend* be, size_t n) {
  const int r = c.rank(), s = c.size();
  std::vector<float> sum_send(s * n), max_send(s * n), want_sum(n), want_max(n);
  for (size_t j = 0; j < s * n; ++j) {
    sum_send[j] = r * 100.0f + j;
    max_send[j] = static_cast<float>(j) + (j % 2 ? r : -r);
  }
  for (size_t i = 0; i < n; ++i) {
    const size_t j = r * n + i;
    want_sum[i] = 100.0f * s * (s - 1) / 2 + static_cast<float>(j) * s;
    want_max[i] = static_cast<float>(j) + (j % 2 ? s - 1 : 0);
  }
  DevBuf bs(be, s * n * sizeof(float)), br(be, n * sizeof(float));
  bs.Put(sum_send);
  c.ReduceScatter(bs.f32(), br.f32(), n, ReduceOp::kSum);
  ExpectSame(br.Get<float>(n), want_sum, absl::StrCat("ReduceScatter sum n=", n));
  bs.Put(max_send);
  c.ReduceScatter(bs.f32(), br.f32(), n, ReduceOp::kMax);
  ExpectSame(br.Get<float>(n), want_max, absl::StrCat("ReduceScatter max n=", n));
}

std::vector<uint8_t> Pattern(size_t bytes, int seed) {
  std::vector<uint8_t> v(bytes);
  for (size_t j = 0; j < bytes; ++j) v[j] = static_cast<uint8_t>(j * 13 + seed * 29 + 1);
  return v;
}

void CheckBroadcast(Communicator& c, Backend* be, size_t bytes, int root) {
  const std::vector<uint8_t> want = Pattern(bytes, root);
  DevBuf b(be, bytes);
  b.Put(c.rank() == root ? want : std::vector<uint8_t>(bytes, 0));
  c.Broadcast(b.data(), bytes, root);
  ExpectSame(b.Get<uint8_t>(bytes), want,
             absl::StrCat("Broadcast of ", bytes, " bytes from root ", root));
}

// Blocking ring: rank 0 sends first, the others receive first (no cycle of blocked senders).
void CheckSendRecvRing(Communicator& c, Backend* be, size_t bytes) {
  const int r = c.rank(), s = c.size();
  const int next = (r + 1) % s, prev = (r + s - 1) % s;
  DevBuf out(be, bytes), in(be, bytes);
  out.Put(Pattern(bytes, r));
  in.Put(std::vector<uint8_t>(bytes, 0));
  if (r == 0) {
    c.Send(out.data(), bytes, next, 100 + r);
    c.Recv(in.data(), bytes, prev, 100 + prev);
  } else {
    c.Recv(in.data(), bytes, prev, 100 + prev);
    c.Send(out.data(), bytes, next, 100 + r);
  }
  ExpectSame(in.Get<uint8_t>(bytes), Pattern(bytes, prev),
             absl::StrCat("ring of ", bytes, " bytes"));
}

// Tags select messages: two messages to the same peer, received in the opposite order.
void CheckTags(Communicator& c, Backend* be, size_t bytes) {
  const int r = c.rank(), s = c.size();
  const int next = (r + 1) % s, prev = (r + s - 1) % s;
  DevBuf a(be, bytes), b(be, bytes), ra(be, bytes), rb(be, bytes);
  a.Put(Pattern(bytes, 2 * r));
  b.Put(Pattern(bytes, 2 * r + 1));
  auto sa = c.ISend(a.data(), bytes, next, 7);
  auto sb = c.ISend(b.data(), bytes, next, 9);
  c.Recv(rb.data(), bytes, prev, 9);
  c.Recv(ra.data(), bytes, prev, 7);
  sa->Wait();
  sb->Wait();
  ExpectSame(ra.Get<uint8_t>(bytes), Pattern(bytes, 2 * prev), "tag 7");
  ExpectSame(rb.Get<uint8_t>(bytes), Pattern(bytes, 2 * prev + 1), "tag 9");
}

// Non-blocking exchange in both directions around the ring.
void CheckISendIRecv(Communicator& c, Backend* be, size_t bytes) {
  const int r = c.rank(), s = c.size();
  const int next = (r + 1) % s, prev = (r + s - 1) % s;
  DevBuf to_next(be, bytes), to_prev(be, bytes), from_prev(be, bytes), from_next(be, bytes);
  to_next.Put(Pattern(bytes, 3 * r));
  to_prev.Put(Pattern(bytes, 3 * r + 1));
  auto r1 = c.IRecv(from_prev.data(), bytes, prev, 1);
  auto r2 = c.IRecv(from_next.data(), bytes, next, 2);
  auto s1 = c.ISend(to_next.data(), bytes, next, 1);
  auto s2 = c.ISend(to_prev.data(), bytes, prev, 2);
  r2->Wait();
  r1->Wait();
  s1->Wait();
  s2.reset();  // destroyed without Wait: waits
  ExpectSame(from_prev.Get<uint8_t>(bytes), Pattern(bytes, 3 * prev),
             absl::StrCat("IRecv from prev, ", bytes, " bytes"));
  ExpectSame(from_next.Get<uint8_t>(bytes), Pattern(bytes, 3 * next + 1),
             absl::StrCat("IRecv from next, ", bytes, " bytes"));
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// No rank leaves the barrier before rank 0 enters it (steady_clock is CLOCK_MONOTONIC, one
// clock for all processes of the machine).
void CheckBarrier(Communicator& c, Backend* be) {
  c.Barrier();
  int64_t entered = 0;
  if (c.rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    entered = NowNs();
  }
  c.Barrier();
  const int64_t left = NowNs();
  DevBuf b(be, sizeof(int64_t));
  b.Put(std::vector<int64_t>{entered});
  c.Broadcast(b.data(), sizeof(int64_t), 0);
  entered = b.Get<int64_t>(1)[0];
  EXPECT_GE(left, entered) << "rank " << c.rank() << " left the barrier before rank 0 entered";
}

// ---- parameterised fixture ------------------------------------------------------------------

enum class CommKind { kSelf, kWorld, kReversed, kParity };
enum class BackendKind { kHost, kCpu, kFakeDevice };

struct Param {
  CommKind comm;
  BackendKind backend;
};

std::string Name(const Param& p) {
  const char* comm[] = {"Self", "MpiWorld", "MpiReversed", "MpiParity"};
  const char* backend[] = {"Host", "Cpu", "FakeDevice"};
  return absl::StrCat(comm[static_cast<int>(p.comm)], backend[static_cast<int>(p.backend)]);
}
std::string ParamName(const ::testing::TestParamInfo<Param>& info) { return Name(info.param); }
void PrintTo(const Param& p, std::ostream* os) { *os << Name(p); }

class CommunicatorTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    const int wr = World().rank, ws = World().size;
    switch (GetParam().backend) {
      case BackendKind::kHost:
        break;
      case BackendKind::kCpu:
        backend_ = MakeBackend("cpu").value();
        break;
      case BackendKind::kFakeDevice:
        backend_ =
            std::make_unique<testing::FakeDeviceBackend>(static_cast<uint8_t>(0x5A + 37 * wr));
        break;
    }
    be_ = backend_.get();
    switch (GetParam().comm) {
      case CommKind::kSelf:
        comm_ = std::make_unique<SelfCommunicator>(be_);
        expect_rank_ = 0;
        expect_size_ = 1;
        break;
      case CommKind::kWorld:
        comm_ = MpiCommunicator::World(be_);
        expect_rank_ = wr;
        expect_size_ = ws;
        break;
      case CommKind::kReversed: {
        std::vector<int> all(ws);
        for (int q = 0; q < ws; ++q) all[q] = ws - 1 - q;
        comm_ = MpiCommunicator::World(be_)->Subgroup(all);
        expect_rank_ = ws - 1 - wr;
        expect_size_ = ws;
        break;
      }
      case CommKind::kParity: {
        std::vector<int> group;
        for (int q = ws - 1; q >= 0; --q) {
          if (q % 2 == wr % 2) group.push_back(q);
        }
        comm_ = MpiCommunicator::World(be_)->Subgroup(group);
        expect_rank_ = static_cast<int>(std::find(group.begin(), group.end(), wr) - group.begin());
        expect_size_ = static_cast<int>(group.size());
        break;
      }
    }
  }

  bool HasPeers() const { return comm_->size() > 1; }

  std::unique_ptr<Backend> backend_;
  Backend* be_ = nullptr;
  std::unique_ptr<Communicator> comm_;
  int expect_rank_ = 0, expect_size_ = 1;
};

TEST_P(CommunicatorTest, RankSizeName) {
  EXPECT_EQ(comm_->rank(), expect_rank_);
  EXPECT_EQ(comm_->size(), expect_size_);
  EXPECT_EQ(comm_->name(), GetParam().comm == CommKind::kSelf ? "self" : "mpi");
}

TEST_P(CommunicatorTest, AllReduceSum) {
  for (size_t n : {1, 7, 1000}) CheckAllReduceSum(*comm_, be_, n);
}

TEST_P(CommunicatorTest, AllReduceMax) {
  for (size_t n : {1, 7, 1000}) CheckAllReduceMax(*comm_, be_, n);
}

TEST_P(CommunicatorTest, AllReduceOfNothing) {
  comm_->AllReduce(nullptr, 0, ReduceOp::kSum);
  comm_->IAllReduce(nullptr, 0, ReduceOp::kSum)->Wait();
}

TEST_P(CommunicatorTest, IAllReduce) {
  for (size_t n : {1, 7, 1000}) CheckIAllReduce(*comm_, be_, n);
}

TEST_P(CommunicatorTest, AllGatherInRankOrder) {
  for (size_t n : {1, 5, 1000}) CheckAllGather(*comm_, be_, n);
}

TEST_P(CommunicatorTest, ReduceScatter) {
  for (size_t n : {1, 6, 500}) CheckReduceScatter(*comm_, be_, n);
}

TEST_P(CommunicatorTest, Broadcast) {
  const int last = comm_->size() - 1;  // a non-zero root whenever there are peers
  for (size_t bytes : {1, 13, 100000}) {
    CheckBroadcast(*comm_, be_, bytes, last);
    CheckBroadcast(*comm_, be_, bytes, 0);
  }
}

TEST_P(CommunicatorTest, SendRecvRing) {
  if (!HasPeers()) GTEST_SKIP() << "no peer to send to";
  for (size_t bytes : {0, 1, 40, 1 << 18}) CheckSendRecvRing(*comm_, be_, bytes);
}

TEST_P(CommunicatorTest, TagsSelectMessages) {
  if (!HasPeers()) GTEST_SKIP() << "no peer to send to";
  for (size_t bytes : {4, 1 << 18}) CheckTags(*comm_, be_, bytes);
}

TEST_P(CommunicatorTest, ISendIRecv) {
  if (!HasPeers()) GTEST_SKIP() << "no peer to send to";
  for (size_t bytes : {0, 24, 1 << 18}) CheckISendIRecv(*comm_, be_, bytes);
}

TEST_P(CommunicatorTest, Barrier) { CheckBarrier(*comm_, be_); }

// Splitting the communicator under test again: two halves, each listed in reverse order.
TEST_P(CommunicatorTest, Subgroup) {
  const int r = comm_->rank(), s = comm_->size(), half = (s + 1) / 2;
  std::vector<int> members;
  for (int q = s - 1; q >= 0; --q) {
    if ((q < half) == (r < half)) members.push_back(q);
  }
  auto sub = comm_->Subgroup(members);
  const int k = static_cast<int>(members.size());
  EXPECT_EQ(sub->size(), k);
  EXPECT_EQ(sub->rank(), std::find(members.begin(), members.end(), r) - members.begin());
  // The members, in new-rank order, are the parent ranks listed.
  DevBuf send(be_, sizeof(float)), recv(be_, k * sizeof(float));
  send.Put(std::vector<float>{static_cast<float>(r)});
  sub->AllGather(send.f32(), recv.f32(), 1);
  ExpectSame(recv.Get<float>(k), std::vector<float>(members.begin(), members.end()),
             "subgroup members");
  CheckAllReduceSum(*sub, be_, 5);
}

// Operations larger than the per-call limit are split into several MPI calls; a limit of 3
// elements exercises every splitting path on small buffers.
TEST_P(CommunicatorTest, SplitsLargeOperations) {
  struct Restore {
    size_t old = MpiCommunicator::SetMaxCountForTesting(3);
    ~Restore() { MpiCommunicator::SetMaxCountForTesting(old); }
  } restore;
  CheckAllReduceSum(*comm_, be_, 10);
  CheckAllReduceMax(*comm_, be_, 10);
  CheckIAllReduce(*comm_, be_, 10);
  CheckAllGather(*comm_, be_, 10);
  CheckReduceScatter(*comm_, be_, 10);
  CheckBroadcast(*comm_, be_, 10, comm_->size() - 1);
  CheckBroadcast(*comm_, be_, 3, 0);
  if (HasPeers()) {
    CheckSendRecvRing(*comm_, be_, 10);
    CheckSendRecvRing(*comm_, be_, 3);
    CheckTags(*comm_, be_, 10);
    CheckISendIRecv(*comm_, be_, 11);
  }
}

// On a device backend, the MPI communicator stages through host copies (the per-rank XOR keys
// already make unstaged transfers fail; this checks the copies happen at all).
TEST_P(CommunicatorTest, StagesDeviceBuffers) {
  if (GetParam().backend != BackendKind::kFakeDevice || GetParam().comm == CommKind::kSelf) {
    GTEST_SKIP() << "only the MPI communicator on a device backend stages";
  }
  auto* fake = static_cast<testing::FakeDeviceBackend*>(be_);
  DevBuf b(be_, 4 * sizeof(float));
  b.Put(std::vector<float>(4, 1.0f));
  const int to_host = fake->to_host_calls, from_host = fake->from_host_calls;
  comm_->AllReduce(b.f32(), 4, ReduceOp::kSum);
  EXPECT_EQ(fake->to_host_calls, to_host + 1);
  EXPECT_EQ(fake->from_host_calls, from_host + 1);
}

std::vector<Param> AllParams() {
  std::vector<Param> params;
  for (CommKind c : {CommKind::kSelf, CommKind::kWorld, CommKind::kReversed, CommKind::kParity}) {
    for (BackendKind b : {BackendKind::kHost, BackendKind::kCpu, BackendKind::kFakeDevice}) {
      params.push_back({c, b});
    }
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(All, CommunicatorTest, ::testing::ValuesIn(AllParams()), ParamName);

}  // namespace
}  // namespace eellm
