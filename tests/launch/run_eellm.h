// Runs the `eellm` binary from tests and captures its exit code and output.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace eellm::testing {

inline constexpr char kEellm[] = EELLM_BINARY_DIR "/eellm";

struct CmdResult {
  int exit_code = -1;  // the process's exit status; 128 + signal if it was killed
  std::string output;  // stdout and stderr, interleaved
};

// Single-quotes `s` for /bin/sh.
inline std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'')
      q += "'\\''";
    else
      q += c;
  }
  return q + "'";
}

// Runs `eellm <args>` (args already shell-quoted where needed), after `launcher` (e.g. an
// mpirun command line) when given.
inline CmdResult RunEellm(const std::string& args, const std::string& launcher = "") {
  const std::string cmd = launcher + Quote(kEellm) + " " + args + " 2>&1";
  CmdResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    r.output = "popen failed for: " + cmd;
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  if (status == -1)
    r.exit_code = -1;
  else if (WIFEXITED(status))
    r.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status))
    r.exit_code = 128 + WTERMSIG(status);
  return r;
}

inline std::string Describe(const std::string& args, const CmdResult& r) {
  return "command: eellm " + args + "\nexit code: " + std::to_string(r.exit_code) + "\noutput:\n" +
         r.output;
}

}  // namespace eellm::testing
