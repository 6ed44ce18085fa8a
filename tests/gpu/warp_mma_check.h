// A one-warp kernel that runs the primitives of engine/cuda/warp_mma.cuh on given 16x16 bf16
// matrices, so that a test can check their register layouts against plain matrix products: on
// the GPU (warp_mma_gpu_tests) this checks the layouts the attention kernels assume against the
// hardware, and under the CPU emulation (cuda_emulation_tests) the emulation against the same
// products. Built twice, like engine/cuda's sources: by nvcc, and as C++ for the emulation
// (gpu/emu/emulated_warp_mma_check.cc, in namespace eellm::testing_emulated).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eellm::testing {

// x, y, z: device pointers to 16x16 row-major bf16 matrices (their bits). out (device, 4 x 256
// floats, row-major 16x16 each) receives, computed with ldmatrix and m16n8k16 MMAs:
//   out[0] = X Y^T  (X by LdMatrixX4 at FragRowsA, Y by LdMatrixX4 at FragRowsBt)
//   out[1] = X Z    (Z by LdMatrixX4Trans at FragRowsA)
//   out[2] = bf16(out[0]) Z  (out[0]'s accumulators made an A operand by AccumulatorsAsA)
//   out[3] = out[0] + X Y^T + 1  (accumulation into non-zero accumulators)
cudaError_t RunWarpMmaCheck(float* out, const uint16_t* x, const uint16_t* y, const uint16_t* z);

}  // namespace eellm::testing
