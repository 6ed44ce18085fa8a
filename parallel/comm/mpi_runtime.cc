#include "parallel/comm/mpi_runtime.h"

#include <mpi.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace eellm {

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized) AbortAllRanks("MpiRuntime: MPI was already finalised and cannot start again");
  if (initialized) return;
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    AbortAllRanks("MpiRuntime: MPI_Init_thread failed");
  }
  // MPI_THREAD_SINGLE would also do in practice (only the main thread calls MPI), so a lower
  // `provided` level is not an error.
  owns_ = true;
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

bool MpiRuntime::Active() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

void AbortAllRanks(const std::string& message, int code) {
  static std::atomic<bool> printed{false};
  if (!printed.exchange(true)) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::fflush(stderr);
  }
  if (code == 0) code = 1;  // an abort never reports success
  if (MpiRuntime::Active()) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

}  // namespace eellm
