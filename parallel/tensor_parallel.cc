#include "parallel/tensor_parallel.h"

#include "engine/core/status.h"

namespace eellm {

VocabShard ShardOfVocab(int vocab, int rank, int size) {
  EE_CHECK(size > 0 && vocab % size == 0, "vocabulary ", vocab, " does not split over ", size);
  const int rows = vocab / size;
  return VocabShard{rank * rows, rows};
}

void TpAllReduce(Communicator* tp, float* x, size_t n) {
  if (tp != nullptr && tp->size() > 1) tp->AllReduce(x, n, ReduceOp::kSum);
}

void VocabParallelEmbedding(Backend* be, Communicator* tp, float* out, const int32_t* ids,
                            const float* table, int n, int c, VocabShard shard) {
  be->EmbeddingForwardRange(out, ids, table, n, c, shard.start, shard.rows);
  TpAllReduce(tp, out, static_cast<size_t>(n) * c);
}

VocabParallelCrossEntropy::VocabParallelCrossEntropy(Backend* be, Communicator* tp, int max_rows)
    : be_(be),
      tp_(tp),
      row_max_(be, max_rows * sizeof(float)),
      sum_exp_(be, max_rows * sizeof(float)),
      target_(be, max_rows * sizeof(float)) {}

void VocabParallelCrossEntropy::Run(float* losses, float* max_prob, Operand dlogits,
                                    ConstOperand logits, const int32_t* targets,
                                    const float* weights, bool by_confidence, int n,
                                    VocabShard shard) {
  EE_CHECK(static_cast<size_t>(n) * sizeof(float) <= row_max_.bytes(), "too many rows: ", n);
  const int v = shard.rows;
  be_->RowMax(row_max_.f32(), logits, n, v);
  if (tp_ != nullptr && tp_->size() > 1) tp_->AllReduce(row_max_.f32(), n, ReduceOp::kMax);
  be_->SumExpAndTarget(sum_exp_.f32(), target_.f32(), logits, row_max_.f32(), targets, n, v,
                       shard.start);
  TpAllReduce(tp_, sum_exp_.f32(), n);
  TpAllReduce(tp_, target_.f32(), n);
  // loss = log(sum exp(l - m)) + m - l[target]; the max probability is exp(0) / sum = 1 / sum
  // (on the device: no wait for the host).
  be_->CrossEntropyFromStats(losses, max_prob, row_max_.f32(), sum_exp_.f32(), target_.f32(), n);
  if (dlogits.data != nullptr) {
    be_->CrossEntropyGradRange(dlogits, logits, row_max_.f32(), sum_exp_.f32(), targets, weights,
                               by_confidence, n, v, shard.start);
  }
}

}  // namespace eellm
