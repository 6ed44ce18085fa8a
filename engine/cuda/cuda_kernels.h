// Launchers of the CUDA backend's kernels (defined in the *.cu files of this folder), with plain
// C++ signatures so that the backend's host code (*.cc, compiled by the host compiler) calls
// them without CUDA syntax. Shapes and semantics are those of engine/backend.h. Every launcher
// enqueues on `stream` and returns cudaGetLastError() (launch errors only; execution errors
// surface at the next synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/core/rope.h"

namespace eellm::cuda {

// A device tensor of fp32 or bf16 elements, for launchers taking either.
struct Elems {
  void* data = nullptr;
  bool bf16 = false;
};

// elementwise_kernels.cu
cudaError_t Fill(float* x, size_t n, float value, cudaStream_t s);
cudaError_t Add(float* y, const float* a, const float* b, size_t n, cudaStream_t s);
// x[i] uniform in [-scale, scale) from a hash of (seed, i); for benchmarks.
cudaError_t FillUniform(float* x, size_t n, uint32_t seed, float scale, cudaStream_t s);
// out[i] = the bf16 bits of x[i] (round to nearest even).
cudaError_t ToBf16(uint16_t* out, const float* x, size_t n, cudaStream_t s);
// x [rows, cols] as bf16 into rows of out `out_stride` elements apart.
cudaError_t ToBf16Rows(uint16_t* out, size_t out_stride, const float* x, int rows, int cols,
                       cudaStream_t s);
cudaError_t Axpy(float* y, float alpha, const float* x, size_t n, cudaStream_t s);
// x *= alpha (bf16: rounded once).
cudaError_t Scale(Elems x, float alpha, size_t n, cudaStream_t s);
cudaError_t ToFloat(float* out, Elems in, size_t n, cudaStream_t s);
// Sums of squares in double over blocks of at most kSquaresBlock elements, one partial each
// (the caller adds the partials on the host in order: deterministic). SumSquaresPartials: x's
// consecutive blocks, SumSquaresBlocks(n) of them; SumSquaresTable: blocks[0, count) of a table.
constexpr size_t kSquaresBlock = size_t{1} << 14;
inline size_t SumSquaresBlocks(size_t n) { return (n + kSquaresBlock - 1) / kSquaresBlock; }
struct SquaresBlock {
  size_t begin, end;  // elements of x
};
cudaError_t SumSquaresPartials(double* partial, const float* x, size_t n, cudaStream_t s);
cudaError_t SumSquaresTable(double* partial, const float* x, const SquaresBlock* blocks, int count,
                            cudaStream_t s);
cudaError_t EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n, int c,
                                  int start, int rows, cudaStream_t s);
// dtable[ids[t] - start] += dout[t] for the ids in [start, start + rows), each row's tokens in
// token order (embedding_backward.cu); `scratch`: scratch_bytes of device memory, at least
// EmbeddingBackwardScratchBytes(n, rows) (0: the size could not be planned).
size_t EmbeddingBackwardScratchBytes(int n, int rows);
cudaError_t EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n,
                                   int c, int start, int rows, void* scratch, size_t scratch_bytes,
                                   cudaStream_t s);
// out[t, :] += table[ids[t], :].
cudaError_t EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c,
                         cudaStream_t s);
// out[r, j] = in[r, j] + bias[j], the bias rounded to bf16 for a bf16 out (out may alias in).
cudaError_t AddBias(Elems out, Elems in, const float* bias, int n, int cols, cudaStream_t s);
// Column sums over many rows and few columns split the rows into slices (block_reduce.cuh) whose
// sums wait in `scratch` (double) for AddColumnPartials: ColumnSumScratchBytes(n, cols, sums)
// bytes for `sums` column sums over n rows (0: not split, scratch may be null).
size_t ColumnSumScratchBytes(int n, int cols, int sums);
// dst[j] += the sum over slices of partials[slice][j] (in a fixed order); with dst2 (or null) a
// second sum in the same launch, its partials following the first's ([2][slices][cols]).
cudaError_t AddColumnPartials(float* dst, float* dst2, const double* partials, int slices, int cols,
                              cudaStream_t s);
// Row r of k and v (rows of `row_bytes`, src_stride bytes apart, both multiples of 16, 16-byte
// aligned like the pools) into row pool_rows[r] of k_pool and v_pool, for r < n (pool_rows in
// device memory; -1: skipped).
cudaError_t CopyRowsToPools(void* k_pool, void* v_pool, const void* k, const void* v,
                            const int32_t* pool_rows, int n, size_t row_bytes, size_t src_stride,
                            cudaStream_t s);
// dst[j] += sum over rows of x[r, j].
cudaError_t ColumnSumAdd(float* dst, Elems x, int n, int cols, double* scratch, cudaStream_t s);
// The inputs and outputs of GELU and SwiGLU, forward and backward, and the forward outputs of the
// norms are operands (engine/tensor/operand.h): fp32 or bf16.
cudaError_t GeluForward(Elems out, Elems x, size_t n, cudaStream_t s);
cudaError_t GeluBackward(Elems dx, Elems dout, Elems x, size_t n, cudaStream_t s);
// From an fp32 product acc[n, cols]: pre = acc + bias (bias in pre's dtype, may be null) and
// act = gelu(acc + bias), each rounded once to its dtype (cuBLASLt's GELU_AUX_BIAS epilogue).
cudaError_t BiasGeluForward(Elems act, Elems pre, const float* acc, const float* bias, int n,
                            int cols, cudaStream_t s);
// SwiGLU over rows of `cols`: gate, up (dgate, dup) rows `stride` apart, out and dout dense.
cudaError_t SwiGluForward(Elems out, Elems gate, Elems up, int rows, int cols, int stride,
                          cudaStream_t s);
// out = (x ? x : 0) + dropout(branch) over n rows of c (engine/backend.h's DropoutAdd).
cudaError_t DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                       uint64_t key, int64_t row0, cudaStream_t s);
cudaError_t SwiGluBackward(Elems dgate, Elems dup, Elems dout, Elems gate, Elems up, int rows,
                           int cols, int stride, cudaStream_t s);
// The first `heads` heads of head_dim of each of x's n rows (`stride` apart) rotated in place
// (sign -1: the inverse); table: device scratch of 2 n (head_dim / 2) floats (each token's cos
// and sin, computed first).
cudaError_t Rope(Elems x, const int32_t* pos, int n, int heads, int head_dim, int stride,
                 const RopeParams& rope, double sign, float* table, cudaStream_t s);
cudaError_t AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float inv_bc1, float inv_bc2,
                  cudaStream_t s);
// AdamW over several runs of one arena in one launch: run r starts at element `first` of the
// runs' concatenation and at `offset` of p, g, m, v; weight_decay applies where `decay`.
struct AdamWRunEntry {
  size_t first, offset;
  bool decay;
};
cudaError_t AdamWRuns(float* p, const float* g, float* m, float* v, const AdamWRunEntry* runs,
                      int count, size_t total, float lr, float beta1, float beta2, float eps,
                      float weight_decay, float inv_bc1, float inv_bc2, cudaStream_t s);

// norm_kernels.cu (the backwards' scratch: NormBackwardScratchBytes(n, c, 2 or 1 for RMSNorm)
// bytes, for the sums of the gain and bias gradients)
size_t NormBackwardScratchBytes(int n, int c, int sums);
cudaError_t LayerNormForward(Elems out, float* mean, float* rstd, const float* x, const float* g,
                             const float* b, int n, int c, float eps, cudaStream_t s);
cudaError_t LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                              const float* x, const float* g, const float* mean, const float* rstd,
                              int n, int c, double* scratch, cudaStream_t s);
cudaError_t RmsNormForward(Elems out, float* rstd, const float* x, const float* g, int n, int c,
                           float eps, cudaStream_t s);
cudaError_t RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                            const float* x, const float* g, const float* rstd, int n, int c,
                            double* scratch, cudaStream_t s);

// softmax_kernels.cu
// In place on s[tq, tk] (row stride tk): row i becomes the softmax over keys 0 .. q_offset + i,
// zeros after; lse[i] (when non-null) gets the row's log-sum-exp.
cudaError_t CausalSoftmaxRows(float* s, float* lse, int tq, int tk, int q_offset, cudaStream_t st);
// In place on s[t, t] holding the scaled scores: row i becomes exp(s - lse[i]) over j <= i
// (the forward's probabilities, recomputed), zeros after.
cudaError_t ProbsFromLse(float* s, const float* lse, int t, cudaStream_t st);
// In place on ds[t, t] holding dP: row i becomes P * (dP - rowsum(P * dP)) over j <= i, zeros
// after (the softmax backward of the causal attention).
cudaError_t SoftmaxBackwardRows(float* ds, const float* p, int t, cudaStream_t st);
// Softmax cross-entropy of n rows of v logits (see Backend::CrossEntropy); `sms`: the device's
// SMs (how many blocks the staged kernel keeps resident).
cudaError_t CrossEntropy(float* losses, float* max_prob, Elems dlogits, Elems logits,
                         const int32_t* targets, const float* weights, bool by_confidence, int n,
                         int v, int sms, cudaStream_t s);
cudaError_t RowMax(float* row_max, Elems logits, int n, int v, cudaStream_t s);
cudaError_t SumExpAndTarget(float* sum_exp, float* target_logit, Elems logits, const float* row_max,
                            const int32_t* targets, int n, int v, int start, cudaStream_t s);
cudaError_t CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                  const float* sum_exp, const float* target_logit, int n,
                                  cudaStream_t s);
cudaError_t CrossEntropyGradRange(Elems dlogits, Elems logits, const float* row_max,
                                  const float* sum_exp, const int32_t* targets,
                                  const float* weights, bool by_confidence, int n, int v, int start,
                                  cudaStream_t s);

// flash_attention.cu: fused causal GQA attention on tensor cores (bf16 operands, fp32
// accumulation; q, k, v, out and the gradients fp32 or bf16 (q, k, v, dq, dk, dv of one dtype,
// out and dout of one dtype), lse fp32),
// for head dimensions FlashAttentionSupports accepts. q, k, v, out, dout and the gradients must be
// 16-byte aligned, and so must q's and k, v's rows, q_ld and kv_ld elements apart
// (Backend::AttentionForward's q_stride and kv_stride; out and dout dense). The backward writes
// dq, dk, dv (of q's dtype, in q, k, v's layout) from dout (of out's dtype) and uses
// dsum[b * hq * t] as scratch.
bool FlashAttentionSupports(int d);
cudaError_t FlashAttentionForward(Elems out, float* lse, Elems q, Elems k, Elems v, int b, int tq,
                                  int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                                  int q_ld, int kv_ld, cudaStream_t s);
// The forward of one sequence (b = 1, no lse) whose keys lie in pages of k, v (key j at row
// pages[j / page_tokens] * page_tokens + j % page_tokens; engine/kv_pages.h); `pages` in device
// memory, page_tokens a power of two; tk = q_offset + tq; q's rows q_ld elements apart.
cudaError_t FlashAttentionForwardPaged(Elems out, Elems q, Elems k, Elems v, const int32_t* pages,
                                       int page_tokens, int tq, int hq, int hkv, int d,
                                       int q_offset, int q_ld, cudaStream_t s);
// One sequence of an inference pass over several sequences' paged caches (device memory).
struct PagedSegment {
  const int32_t* pages = nullptr;  // its page table (device)
  int row = 0;                     // its first row of the pass's q and out
  int rows = 0;                    // its queries, at positions q_offset .. q_offset + rows - 1
  int q_offset = 0;
  int unused = 0;
};
// FlashAttentionForwardPaged for `count` segments (device memory) in one launch, every segment's
// keys in the same pools k, v; max_rows: the most rows of a segment.
cudaError_t FlashAttentionForwardSegments(Elems out, Elems q, Elems k, Elems v,
                                          const PagedSegment* segments, int count, int max_rows,
                                          int page_tokens, int hq, int hkv, int d, int q_ld,
                                          cudaStream_t s);

// paged_decode.cu: the segments of a pass whose rows times the query heads of a KV head
// (hq / hkv: the segment's pairs) are at most PagedDecodeRows() (decoding steps, short checks),
// grouped by KV head: each K and V tile is read once per 16 pairs of a KV head, and long caches
// are split over blocks (PlanDecodeSplits, from the device's SM count and the most pairs and
// keys of a segment: as many splits as fill the SMs twice, at least 256 keys each; partial_bytes
// of workspace where there is more than one). Same operands and layouts as
// FlashAttentionForwardSegments.
int PagedDecodeRows();
struct DecodeSplits {
  int splits = 1, split_keys = 0;
  int row_blocks = 1;  // blocks of 16 pairs per (segment, KV head)
  size_t partial_bytes = 0;
};
DecodeSplits PlanDecodeSplits(int sms, int count, int hkv, int max_pairs, int max_keys, int d);
cudaError_t PagedDecodeAttention(Elems out, Elems q, Elems k, Elems v, const PagedSegment* segments,
                                 int count, int page_tokens, int hq, int hkv, int d, int q_ld,
                                 const DecodeSplits& plan, float* partial, cudaStream_t s);

// q and dq rows q_ld elements apart, k, v, dk and dv rows kv_ld (Backend::AttentionBackward).
cudaError_t FlashAttentionBackward(Elems dq, Elems dk, Elems dv, Elems dout, Elems out,
                                   const float* lse, float* dsum, Elems q, Elems k, Elems v, int b,
                                   int t, int hq, int hkv, int d, int q_ld, int kv_ld,
                                   cudaStream_t s);

}  // namespace eellm::cuda
