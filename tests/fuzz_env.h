// Iterations and seed of the fuzz loops (safetensors and tokenizer.json parsers): the test's
// defaults, or EELLM_FUZZ_ITERATIONS and EELLM_FUZZ_SEED from the environment (longer runs by
// hand).
#pragma once

#include <cstdint>
#include <cstdlib>

namespace eellm::testing {

inline int FuzzIterations(int default_iterations) {
  const char* env = std::getenv("EELLM_FUZZ_ITERATIONS");
  return env != nullptr ? std::atoi(env) : default_iterations;
}

inline uint32_t FuzzSeed(uint32_t default_seed) {
  const char* env = std::getenv("EELLM_FUZZ_SEED");
  return env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : default_seed;
}

}  // namespace eellm::testing
