// Hidden dropout's mask (Megatron's --hidden-dropout), one definition for every backend: the CPU,
// the CUDA kernels and their CPU emulation. Element `index` of a tensor dropped under `key` is
// kept when the top 32 bits of a hash of (key, index) reach `threshold` = p * 2^32, so the mask
// is a pure function of its coordinates: nothing is stored between the forward and the
// backward, every backend draws the same mask, and parallel layouts that hand a row to another
// rank still drop the same elements of it (the caller numbers rows globally).
#pragma once

#include <cstdint>

#include "engine/core/host_device.h"

namespace eellm {

// splitmix64's finaliser (as engine/core/rng.h's SplitMix64), usable in kernels.
EE_HOST_DEVICE inline uint64_t DropoutMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

EE_HOST_DEVICE inline bool DropoutKeep(uint64_t key, uint64_t index, uint32_t threshold) {
  return static_cast<uint32_t>(DropoutMix(key ^ DropoutMix(index)) >> 32) >= threshold;
}

// p in [0, 1): the threshold DropoutKeep compares with.
inline uint32_t DropoutThreshold(float p) {
  return p <= 0.0f ? 0u : static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);
}

}  // namespace eellm
