// eellm command-line entry point: dispatches to subcommands.
#include <unistd.h>

#include <cstdlib>

#include "launch/commands.h"

int main(int argc, char** argv) {
  // OpenMP workers that spin while idle steal cores from OpenBLAS and from other processes on
  // small machines (measured 30x slowdowns under load, and no gain when idle). libgomp reads
  // OMP_WAIT_POLICY when it loads, before main, so set it and re-execute once.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure; then go on as we are
  }
  return eellm::RunCli(argc, argv);
}
