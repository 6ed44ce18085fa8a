// abort_probe MODE: a 2-rank MPI program in which one rank hits a fatal error while the other
// waits in a collective; abort_test.cc runs it under mpirun and checks that the whole job ends
// quickly, non-zero, with the error message. Modes:
//   abort              rank 1 calls AbortAllRanks; rank 0 waits in a Barrier
//   mpi-error          rank 1 sends to a rank that does not exist (an MPI error code)
//   recv-size          rank 1 expects a longer message than rank 0 sends
//   subgroup-mismatch  the two ranks pass different lists to Subgroup
//   bad-layout         every rank asks for tp=2, pp=2, dp=2 on 2 ranks and aborts with the status
//   ok                 no error (exits 0)
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "parallel/comm/mpi_communicator.h"
#include "parallel/comm/mpi_runtime.h"
#include "parallel/parallel_context.h"

int main(int argc, char** argv) {
  eellm::MpiRuntime mpi(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "";
  auto world = eellm::MpiCommunicator::World(nullptr);
  const int rank = world->rank();
  if (mode == "abort") {
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // rank 0 is in the barrier
      eellm::AbortAllRanks("abort_probe: rank 1 gives up", 3);
    }
    world->Barrier();
  } else if (mode == "mpi-error") {
    char byte = 0;
    if (rank == 1) world->Send(&byte, 1, 99, 0);
    world->Barrier();
  } else if (mode == "recv-size") {
    char bytes[8] = {};
    if (rank == 0) world->Send(bytes, 4, 1, 0);
    if (rank == 1) world->Recv(bytes, 8, 0, 0);
    world->Barrier();
  } else if (mode == "subgroup-mismatch") {
    auto sub = world->Subgroup(rank == 0 ? std::vector<int>{0, 1} : std::vector<int>{1, 0});
    sub->Barrier();
  } else if (mode == "bad-layout") {
    auto ctx = eellm::ParallelContext::Create(std::move(world), 2, 2, 2);
    if (!ctx.ok()) eellm::AbortAllRanks(std::string(ctx.status().message()));
  } else if (mode != "ok") {
    std::fprintf(stderr, "abort_probe: unknown mode \"%s\"\n", mode.c_str());
    return 2;
  }
  std::printf("abort_probe: rank %d finished\n", rank);
  return 0;
}
