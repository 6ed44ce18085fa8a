// A fatal error on one rank ends the whole MPI job: non-zero, within seconds, with the message
// (runs tests/parallel/abort_probe.cc under mpirun with 2 ranks; ctest label "mpi").
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace eellm {
namespace {

struct JobResult {
  int exit_code = -1;  // of `timeout`: 124 when the job hung
  std::string output;  // stdout and stderr of all ranks
  double seconds = 0;
};

JobResult RunProbe(const std::string& mode) {
  const std::string cmd = std::string(
                              "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                              "OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1 "
                              "OMP_NUM_THREADS=1 timeout 30 ") +
                          EELLM_MPIEXEC + " -n 2 " + EELLM_ABORT_PROBE + " " + mode + " 2>&1";
  JobResult r;
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  std::array<char, 4096> chunk;
  size_t got;
  while ((got = fread(chunk.data(), 1, chunk.size(), pipe)) > 0) r.output.append(chunk.data(), got);
  const int status = pclose(pipe);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

void ExpectJobAborted(const std::string& mode, const std::vector<std::string>& messages) {
  const JobResult r = RunProbe(mode);
  SCOPED_TRACE("abort_probe " + mode + " output:\n" + r.output);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.exit_code, 124) << "the job hung until `timeout` killed it";
  EXPECT_LT(r.seconds, 20.0);
  EXPECT_NE(r.output.find("error: "), std::string::npos);
  for (const std::string& m : messages) {
    EXPECT_NE(r.output.find(m), std::string::npos) << "missing: " << m;
  }
  EXPECT_EQ(r.output.find("abort_probe: rank 0 finished"), std::string::npos);
}

TEST(MpiAbortTest, ProbeRunsCleanlyWithoutAnError) {
  const JobResult r = RunProbe("ok");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("abort_probe: rank 0 finished"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("abort_probe: rank 1 finished"), std::string::npos) << r.output;
}

TEST(MpiAbortTest, OneRankAbortingEndsTheJob) {
  ExpectJobAborted("abort", {"error: abort_probe: rank 1 gives up"});
}

TEST(MpiAbortTest, MpiErrorEndsTheJobWithMpisMessage) {
  // The operation, its arguments and MPI's error string.
  ExpectJobAborted("mpi-error", {"Send of 1 bytes to peer 99 tag 0", "MPI_ERR_RANK"});
}

TEST(MpiAbortTest, ShortMessageEndsTheJob) {
  ExpectJobAborted("recv-size", {"expected a message of 8 bytes, got 4"});
}

TEST(MpiAbortTest, DisagreeingSubgroupsEndTheJob) {
  ExpectJobAborted("subgroup-mismatch", {"every member must pass the same list"});
}

TEST(MpiAbortTest, BadLayoutEndsTheJob) {
  ExpectJobAborted("bad-layout", {"world size 2 is not tp * pp * dp = 2 * 2 * 2 = 8"});
}

}  // namespace
}  // namespace eellm
