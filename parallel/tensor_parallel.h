// Tensor-parallel building blocks on the tensor-parallel communicator (Megatron's conjugate
// pairs): the vocabulary split into contiguous shards, the vocabulary-parallel embedding
// (local lookup, all-reduce) and the vocabulary-parallel cross-entropy, which combines per-rank
// row statistics (max, sum of exponentials, target logit) and never gathers the logits.
#pragma once

#include <cstdint>

#include "engine/backend.h"
#include "parallel/comm/communicator.h"

namespace eellm {

// Rows [start, start + rows) of a vocabulary of `vocab` split evenly over `size` ranks.
struct VocabShard {
  int start = 0;
  int rows = 0;
};
VocabShard ShardOfVocab(int vocab, int rank, int size);

// Sums x[n] over the tensor-parallel group in place (no-op for one rank). This is the forward
// of "reduce from the tensor-parallel region" and the backward of "copy to" it.
void TpAllReduce(Communicator* tp, float* x, size_t n);

// out[n, c] = word embedding rows of ids; each rank holds `shard` rows of the table.
void VocabParallelEmbedding(Backend* be, Communicator* tp, float* out, const int32_t* ids,
                            const float* table, int n, int c, VocabShard shard);

// Cross-entropy with the contract of Backend::CrossEntropy, for logits [n, shard.rows] split by
// vocabulary over the tensor-parallel group (targets are global ids). Owns its scratch.
class VocabParallelCrossEntropy {
 public:
  VocabParallelCrossEntropy(Backend* be, Communicator* tp, int max_rows);
  void Run(float* losses, float* max_prob, Operand dlogits, ConstOperand logits,
           const int32_t* targets, const float* weights, bool by_confidence, int n,
           VocabShard shard);

 private:
  Backend* be_;
  Communicator* tp_;
  Buffer row_max_, sum_exp_, target_;
};

}  // namespace eellm
