// Sequence parallelism (Megatron's --sequence-parallel) under tensor parallelism: between the
// column- and row-parallel GEMMs the residual stream, the norms and the exits' inputs hold only
// this rank's block of rows (rows [rank * n / tp, (rank + 1) * n / tp) of the n = b * t rows),
// so their activations take 1/tp of the memory. Entering a branch all-gathers the normalised
// rows (its backward reduce-scatters their gradient); leaving it reduce-scatters the row-parallel
// partial sums (its backward all-gathers the gradient): the all-reduce of plain tensor
// parallelism split in two, the same bytes on the wire. Norm gains and biases see only local
// rows, so their gradients are summed over the group (ParamInfo::sum_grad_over_tp).
#pragma once

#include <cstddef>

#include "engine/backend.h"
#include "parallel/comm/communicator.h"

namespace eellm {

// Whole-row scratch of a sequence-parallel model, shared by its layers and workspaces (one
// layer's gather or scatter at a time). n rows of c: `gathered` (operand dtype) the gathered
// GEMM inputs, `gathered_f32` fp32 inputs gathered on bf16 backends, `full` the row-parallel
// partial sums and the gathered gradients; `local` [n / tp, c] reduce-scattered gradients.
struct SpScratch {
  Operand gathered;
  float* gathered_f32 = nullptr;
  float* full = nullptr;
  float* local = nullptr;
};

// The whole [n, c] of every rank's [rows, c] block (rank order), in the scratch: `gathered` for
// operands of the backend's operand dtype, `gathered_f32` for fp32 ones on a bf16 backend.
ConstOperand GatherRows(Backend* be, Communicator* tp, const SpScratch& s, ConstOperand local,
                        int rows, int c);
// The whole [n, c] fp32 gradient of every rank's [rows, c] block, in s.full.
const float* GatherGradRows(Communicator* tp, const SpScratch& s, const float* local, int rows,
                            int c);
// local[rows, c] = sum over ranks of their full[n, c]'s rows of this rank.
void ReduceScatterRows(Communicator* tp, const float* full, float* local, int rows, int c);

}  // namespace eellm
