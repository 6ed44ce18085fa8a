// The NCCL communicator's point-to-point messages on the CPU emulation of NCCL (a send completes
// only when its receive is posted, messages between two ranks pair in order): held sends and
// receives go out as one group when posted, which the pipeline's batched exchanges need. Run
// under mpirun with the layout tests (1 rank skips).
#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"
#include "tests/gpu/emu/emulated_nccl.h"

namespace eellm {
namespace {

std::vector<float> Pattern(int rank, int which, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = 1000.0f * rank + 100.0f * which + static_cast<float>(i);
  return v;
}

class NcclMessages : public ::testing::Test {
 protected:
  void SetUp() override {
    auto be = MakeBackendOrEmulated("emulated-cuda");
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = std::move(*be);
    const int world = MpiCommunicator::World(nullptr)->size();
    if (world < 2) GTEST_SKIP() << "needs a neighbour";
    auto ctx = ParallelContext::Create(MpiCommunicator::World(be_.get()), 1, world, 1);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = std::move(*ctx);
    UseEmulatedNcclForModelParallel(ctx_.get(), MpiCommunicator::World(nullptr).get());
    ASSERT_EQ(ctx_->pp->name(), "nccl");
  }

  Buffer Put(const std::vector<float>& v) {
    Buffer b(be_.get(), v.size() * sizeof(float));
    be_->CopyFromHost(b.data(), v.data(), v.size() * sizeof(float));
    return b;
  }
  std::vector<float> Get(const Buffer& b, size_t n) {
    std::vector<float> v(n);
    be_->CopyToHost(v.data(), b.data(), n * sizeof(float));
    return v;
  }

  std::unique_ptr<Backend> be_;
  std::unique_ptr<ParallelContext> ctx_;
};

// Every rank sends to both neighbours and receives from both, as one batched exchange of a
// pipeline stage (activations forward, gradients back). Posted one by one, each rank's first
// receive would wait for a send its neighbour has not posted: the exchange only completes as
// one group (a regression hangs until mpirun's time limit).
TEST_F(NcclMessages, BatchedExchangeCompletesAsOneGroup) {
  Communicator& c = *ctx_->pp;
  const int r = c.rank(), s = c.size(), next = (r + 1) % s, prev = (r + s - 1) % s;
  const size_t n = 1000;
  for (int round = 0; round < 3; ++round) {
    Buffer to_next = Put(Pattern(r, 2 * round, n)), to_prev = Put(Pattern(r, 2 * round + 1, n));
    Buffer from_prev(be_.get(), n * sizeof(float)), from_next(be_.get(), n * sizeof(float));
    // The order of a pipeline exchange: sends (forward, then backward), then receives.
    auto s1 = c.ISend(to_next.data(), n * sizeof(float), next, 0);
    auto s2 = c.ISend(to_prev.data(), n * sizeof(float), prev, 1);
    auto r1 = c.IRecv(from_prev.data(), n * sizeof(float), prev, 0);
    auto r2 = c.IRecv(from_next.data(), n * sizeof(float), next, 1);
    c.PostHeld();
    r1->Wait();
    r2->Wait();
    s1->Wait();
    s2->Wait();
    EXPECT_EQ(Get(from_prev, n), Pattern(prev, 2 * round, n)) << "round " << round;
    EXPECT_EQ(Get(from_next, n), Pattern(next, 2 * round + 1, n)) << "round " << round;
  }
}

// A Wait on a held operation posts everything held with it; a blocking Recv does the same with
// the sends held before it (1F1B's send-then-receive of the other direction).
TEST_F(NcclMessages, WaitAndRecvPostWhatIsHeld) {
  Communicator& c = *ctx_->pp;
  const int r = c.rank(), s = c.size(), next = (r + 1) % s, prev = (r + s - 1) % s;
  const size_t n = 7;
  Buffer out = Put(Pattern(r, 0, n)), in(be_.get(), n * sizeof(float));
  auto send = c.ISend(out.data(), n * sizeof(float), next, 0);
  auto recv = c.IRecv(in.data(), n * sizeof(float), prev, 0);
  send->Wait();  // posts both
  recv->Wait();
  EXPECT_EQ(Get(in, n), Pattern(prev, 0, n));
  Buffer back = Put(Pattern(r, 1, n)), got(be_.get(), n * sizeof(float));
  auto held = c.ISend(back.data(), n * sizeof(float), prev, 1);
  c.Recv(got.data(), n * sizeof(float), next, 1);
  held.reset();  // destroyed: waits
  EXPECT_EQ(Get(got, n), Pattern(next, 1, n));
}

}  // namespace
}  // namespace eellm
