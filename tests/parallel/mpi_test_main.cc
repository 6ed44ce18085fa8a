// GoogleTest main for tests that run under mpirun: MPI starts before anything else, only rank
// 0 prints the usual report (the other ranks print just their failures, prefixed with their
// rank), and every rank exits non-zero when any rank had a failure.
#include <gtest/gtest.h>

#include <cstdio>

#include "parallel/comm/mpi_communicator.h"
#include "parallel/comm/mpi_runtime.h"

namespace {

// The report of ranks > 0: failures only.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& t) override {
    if (t.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, t.test_suite_name(), t.name());
    }
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  eellm::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int failed = 0;
  {
    auto world = eellm::MpiCommunicator::World(nullptr);
    const int rank = world->rank();
    if (rank > 0) {
      ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new FailurePrinter(rank));
    }
    float local = RUN_ALL_TESTS() != 0 ? 1.0f : 0.0f;
    world->AllReduce(&local, 1, eellm::ReduceOp::kMax);
    failed = local != 0.0f;
    if (rank == 0 && failed) std::fprintf(stderr, "a test failed on some rank\n");
  }
  return failed;
}
