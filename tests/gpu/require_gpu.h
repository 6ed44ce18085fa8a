// EELLM_REQUIRE_GPU=1 (set by tools/gpu_check.sh on the GPU machine) turns the skips of the gpu
// tests into failures: a run where no test reached the GPU must not pass.
#pragma once

#include <cstdlib>
#include <cstring>

namespace eellm::testing {

inline bool GpuRequired() {
  const char* env = std::getenv("EELLM_REQUIRE_GPU");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

}  // namespace eellm::testing
