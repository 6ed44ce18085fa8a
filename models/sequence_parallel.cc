#include "models/sequence_parallel.h"

#include "engine/core/status.h"

namespace eellm {

ConstOperand GatherRows(Backend* be, Communicator* tp, const SpScratch& s, ConstOperand local,
                        int rows, int c) {
  const size_t elems = static_cast<size_t>(rows) * c;
  if (local.dtype == DType::kF32) {
    float* out = be->operand_dtype() == DType::kF32 ? s.gathered.f32() : s.gathered_f32;
    tp->AllGather(static_cast<const float*>(local.data), out, elems);
    return out;
  }
  // bf16: gathered as pairs of elements (an all-gather moves bytes; no arithmetic).
  EE_CHECK(elems % 2 == 0, "sequence parallelism gathers bf16 blocks of ", elems,
           " elements, an odd number");
  EE_CHECK(local.dtype == s.gathered.dtype, "gathering ", DTypeName(local.dtype), " rows into ",
           DTypeName(s.gathered.dtype), " scratch");
  tp->AllGather(static_cast<const float*>(local.data), static_cast<float*>(s.gathered.data),
                elems / 2);
  return s.gathered;
}

const float* GatherGradRows(Communicator* tp, const SpScratch& s, const float* local, int rows,
                            int c) {
  tp->AllGather(local, s.full, static_cast<size_t>(rows) * c);
  return s.full;
}

void ReduceScatterRows(Communicator* tp, const float* full, float* local, int rows, int c) {
  tp->ReduceScatter(full, local, static_cast<size_t>(rows) * c, ReduceOp::kSum);
}

}  // namespace eellm
