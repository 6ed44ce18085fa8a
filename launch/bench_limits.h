// The device limits the benchmarks (`eellm bench train`, `bench attention`) set their
// measurements against, measured on the backend in the same run: the GEMM ceiling in the
// backend's own precision and the copy bandwidth.
#pragma once

#include "engine/backend.h"

namespace eellm {

// GEMM ceiling of the backend in its own precision (FLOP/s): a square GEMM as the model's Linear
// runs it, activations in the backend's operand dtype and a registered weight (so a backend that
// keeps bf16 weight copies multiplies bf16 by bf16).
double GemmCeiling(Backend* be);

// The backend's memory bandwidth: bytes read plus written per second by a device-to-device copy
// of 1 GiB (64 MiB on the CPU), the best of 4.
double CopyBandwidth(Backend* be);

}  // namespace eellm
