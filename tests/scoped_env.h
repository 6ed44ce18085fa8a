// An environment variable set (or removed) for a scope, then restored: tests of settings read
// from the environment (EELLM_CUDNN_ATTENTION, EELLM_GEMM_TUNE, the launchers' rank variables)
// leave the process as they found it, whatever the test's outcome.
#pragma once

#include <cstdlib>
#include <string>

namespace eellm::testing {

class ScopedEnv {
 public:
  // value nullptr removes the variable for the scope.
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

}  // namespace eellm::testing
