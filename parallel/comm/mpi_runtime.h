// MpiRuntime: RAII ownership of the MPI library for one process (MPI_Init_thread with
// MPI_THREAD_FUNNELED: only the main thread calls MPI; OpenMP workers never do), and
// AbortAllRanks: the one way a rank reports a fatal error so that no other rank hangs.
// This header does not include mpi.h (only parallel/comm's MPI sources do).
#pragma once

#include <string>

namespace eellm {

class MpiRuntime {
 public:
  // Initialises MPI unless it already is (then this object owns nothing). argc/argv may be
  // null. Initialising after MPI_Finalize is impossible and aborts the process with a message.
  MpiRuntime(int* argc = nullptr, char*** argv = nullptr);
  // Finalises MPI if this object initialised it. Every communicator must be destroyed first.
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // True between MPI_Init and MPI_Finalize (whoever called them).
  static bool Active();

 private:
  bool owns_ = false;
};

// Prints "error: <message>" to stderr (this rank's, once) and ends the job: MPI_Abort on
// MPI_COMM_WORLD when MPI is active (every rank exits non-zero, none hangs in a collective),
// std::exit(code) otherwise. A
// code of 0 is taken as 1: an abort never reports success.
[[noreturn]] void AbortAllRanks(const std::string& message, int code = 1);

}  // namespace eellm
