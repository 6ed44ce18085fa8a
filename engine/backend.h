// The Backend interface: every numerical op the models use, forward and backward, on raw
// device pointers with explicit dimensions (llm.c style). Model code calls only this interface
// and never branches on the device. The CPU backend (engine/cpu) is the numerical oracle; a
// CUDA backend implements the same contract. Ops never allocate.
//
// Conventions: row-major; "n" is the number of token rows; gradients named d* are ACCUMULATED
// (+=) into unless the comment says "written". All compute is fp32 on the CPU. Activations that
// tensor cores multiply, and the gradients of those activations (Operand: Linear's input and
// output, the FFN's gate/up outputs, RoPE's q and k, attention's q, k, v and out, and their
// gradients written by a backward and read by the next GEMM; engine/tensor/operand.h) are fp32
// or bf16 (operand_dtype()); every other tensor (parameters and their gradients, the residual
// stream and its gradient, statistics) is fp32. Compute and reductions are fp32 either way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/core/rope.h"
#include "engine/kv_pages.h"
#include "engine/tensor/operand.h"
#include "engine/tensor/tensor.h"

namespace eellm {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // The dtype this backend wants GEMM operands stored in (model code allocates them so); ops
  // also accept fp32 operands. The CPU backend accepts fp32 only.
  virtual DType operand_dtype() const { return DType::kF32; }

  // ---- memory -------------------------------------------------------------------------------
  virtual void* Alloc(size_t bytes) = 0;  // 64-byte aligned, uninitialised
  // Bytes free for new allocations on the backend's memory now (the CPU: the system's available
  // memory; CUDA: the device's free memory); -1 when unknown.
  virtual int64_t AvailableMemoryBytes() const { return -1; }
  virtual void Free(void* p) = 0;
  // Host copies. CopyToHost returns with the bytes in host_dst (after every op before it).
  // CopyFromHost may return before the device holds the bytes (ops after it see them), but
  // host_src may change or go as soon as it returns.
  virtual void CopyToHost(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void CopyFromHost(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void Copy(void* dst, const void* src, size_t bytes) = 0;
  // `rows` rows of row_bytes from src (src_pitch bytes apart) to dst (dst_pitch apart), both on
  // the backend; the default runs a Copy per row.
  virtual void CopyRows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                        size_t row_bytes, int rows);
  virtual void Synchronize() = 0;

  // ---- elementwise and reductions -----------------------------------------------------------
  virtual void Fill(float* x, size_t n, float value) = 0;
  // y = a + b (written; y may alias a or b).
  virtual void Add(float* y, const float* a, const float* b, size_t n) = 0;
  // y += alpha * x.
  virtual void Axpy(float* y, float alpha, const float* x, size_t n) = 0;
  // x *= alpha (a bf16 x is rounded once, after the product).
  virtual void Scale(Operand x, float alpha, size_t n) = 0;
  // out[i] = in[i] as fp32 (a bf16 operand widened; an fp32 one copied).
  virtual void ToFloat(float* out, ConstOperand in, size_t n) = 0;
  // Sum of squares, accumulated in double.
  virtual double SumSquares(const float* x, size_t n) = 0;
  // Elements [x + offset, x + offset + count) of one array (an arena's tensors).
  struct Range {
    size_t offset = 0, count = 0;
    bool operator==(const Range& o) const { return offset == o.offset && count == o.count; }
  };
  // The ranges' sums of squares added in order (the gradient norm over an arena's counted
  // tensors). By default a SumSquares per range; a backend may reduce them all in one pass with
  // the same result (a GPU: one launch and one read-back instead of one per range).
  virtual double SumSquaresRanges(const float* x, const std::vector<Range>& ranges);

  // ---- embedding ----------------------------------------------------------------------------
  // out[t, :] = table[ids[t], :]   (written); ids: [n], table: [vocab, c].
  virtual void EmbeddingForward(float* out, const int32_t* ids, const float* table, int n,
                                int c) = 0;
  // dtable[ids[t], :] += dout[t, :].
  virtual void EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                                 int c) = 0;
  // out[t, :] += table[ids[t], :] (GPT's learned positions added to the token embeddings; the
  // caller checks the ids).
  virtual void EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) = 0;

  // ---- linear -------------------------------------------------------------------------------
  // out[n, o] = in[n, i] @ w[o, i]^T + bias[o]; bias may be null. Written, or added to out when
  // `accumulate` is true.
  virtual void Linear(Operand out, ConstOperand in, const float* w, const float* bias, int n,
                      int in_dim, int out_dim, bool accumulate) = 0;
  // out[n, o] = residual[n, o] + in[n, i] @ w[o, i]^T + bias[o] (written; bias may be null; out
  // may alias residual): the output projection of a residual branch, fp32 like the residual
  // stream. By default a Copy and an accumulating Linear; a backend may read the residual in
  // the GEMM instead (one pass over the stream less).
  virtual void LinearResidual(float* out, const float* residual, ConstOperand in, const float* w,
                              const float* bias, int n, int in_dim, int out_dim);
  // The first projection of a GELU MLP: pre[n, o] = in @ w^T + bias and act = gelu(pre) (both
  // written; bias may be null). By default a Linear and a GeluForward; a backend may apply the
  // GELU in the GEMM's epilogue (one pass over [n, o] less; act then comes from pre before its
  // rounding to pre's dtype).
  virtual void LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w,
                          const float* bias, int n, int in_dim, int out_dim);
  // LinearBackward of a projection whose input is act = gelu(pre), through the GELU:
  // dpre[n, i] = gelu'(pre) * (dout @ w) (written); dw[o, i] += dout^T @ act; dbias[o] +=
  // sum_n dout (if non-null). A LinearBackward into dpre and a GeluBackward in place (dout @ w
  // rounded to dpre's dtype before gelu' multiplies it); a backend may apply gelu' in the GEMM's
  // epilogue with the same roundings.
  virtual void LinearBackwardGelu(Operand dpre, float* dw, float* dbias, ConstOperand dout,
                                  ConstOperand act, ConstOperand pre, const float* w, int n,
                                  int in_dim, int out_dim);
  // din[n, i] = dout @ w (written; or added when accumulate_din; skipped when din.data is null);
  // dw[o, i] += dout^T @ in (skipped when dw is null); dbias[o] += sum_n dout (if non-null).
  virtual void LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout,
                              ConstOperand in, const float* w, int n, int in_dim, int out_dim,
                              bool accumulate_din) = 0;

  // ---- norms (over the last dimension c) ----------------------------------------------------
  // out = (x - mean) * rstd * g + b (b may be null); saves mean[n], rstd[n]. out written.
  virtual void LayerNormForward(Operand out, float* mean, float* rstd, const float* x,
                                const float* g, const float* b, int n, int c, float eps) = 0;
  // dx = dres + d/dx (written; dres may alias dx, which then accumulates, or be null: dx =
  // d/dx; the residual connection's gradient passes through here without a copy);
  // dg += ...; db += ... (db may be null).
  virtual void LayerNormBackward(float* dx, const float* dres, float* dg, float* db,
                                 const float* dout, const float* x, const float* g,
                                 const float* mean, const float* rstd, int n, int c) = 0;
  // out = x * rstd * g, rstd = 1/sqrt(mean(x^2) + eps); saves rstd[n]. out written.
  virtual void RmsNormForward(Operand out, float* rstd, const float* x, const float* g, int n,
                              int c, float eps) = 0;
  // dx = dres + d/dx (as LayerNormBackward); dg += ....
  virtual void RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                               const float* x, const float* g, const float* rstd, int n, int c) = 0;

  // ---- activations --------------------------------------------------------------------------
  // GELU, tanh approximation (GPT-2). out written; dx written (dx may alias dout when both have
  // one dtype).
  virtual void GeluForward(Operand out, ConstOperand x, size_t n) = 0;
  virtual void GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) = 0;
  // SwiGLU over `rows` rows of `cols`: out[r, j] = silu(gate[r, j]) * up[r, j]. gate and up
  // (and dgate, dup) have their rows `stride` elements apart (stride >= cols; the gate and up
  // halves of one [rows, 2 cols] GEMM output have stride 2 cols); out and dout are dense
  // [rows, cols]. out written; dgate, dup written (they may alias gate and up, not dout).
  virtual void SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows, int cols,
                             int stride) = 0;
  virtual void SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout, ConstOperand gate,
                              ConstOperand up, int rows, int cols, int stride) = 0;

  // ---- hidden dropout (training; engine/core/dropout.h) -------------------------------------
  // out[i, j] = (x ? x[i, j] : 0) + branch[i, j] * keep(i, j) / (1 - p) over n rows of c, where
  // keep(i, j) = DropoutKeep(key, (row0 + i) * c + j, DropoutThreshold(p)). out may alias branch.
  virtual void DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                          uint64_t key, int64_t row0) = 0;
  // dbranch[i, j] = dout[i, j] * keep(i, j) / (1 - p), the same mask (dbranch may alias dout).
  virtual void DropoutBackward(float* dbranch, const float* dout, int n, int c, float p,
                               uint64_t key, int64_t row0) = 0;

  // ---- rotary position embedding ------------------------------------------------------------
  // In place on x: n rows (tokens) `stride` elements apart (heads * head_dim when dense), each
  // starting with `heads` heads of head_dim (the rest of a row is left as it is: the q and k
  // parts of a [n, (hq + 2 hkv) d] row rotate in one call, v not). Token t sits at position
  // pos[t]. Rotates the pairs (i, i + head_dim/2) by angle pos * RopeInvFreq(rope, i, head_dim)
  // (engine/core/rope.h; unscaled: theta^(-2i/head_dim)), the Llama / Hugging Face "rotate_half"
  // convention.
  virtual void RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim,
                           int stride, const RopeParams& rope) = 0;
  // In place on the gradient: applies the inverse rotation.
  virtual void RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim,
                            int stride, const RopeParams& rope) = 0;

  // ---- causal self-attention with grouped-query heads ---------------------------------------
  // q: [b, tq, hq, d]; k, v: [b, tk_cap, hkv, d] of which the first tk positions are valid.
  // Their rows (tokens) lie q_stride and kv_stride elements apart (hq d and hkv d when dense;
  // the q, k and v parts of one [b t, (hq + 2 hkv) d] buffer have (hq + 2 hkv) d; what lies
  // between is not read). Query i sits at absolute position q_offset + i and attends keys
  // 0 .. q_offset + i (training: q_offset = 0, tq = tk = tk_cap; KV-cache decode: q_offset =
  // tokens cached before, tk = q_offset + tq). Query head h uses KV head h / (hq / hkv). Scale
  // 1/sqrt(d). out: [b, tq, hq, d] written (dense). lse: [b, hq, tq], when non-null, written with
  // each query row's log-sum-exp of its scaled scores (what the backward needs; nothing [t, t]
  // is kept).
  virtual void AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k,
                                ConstOperand v, int b, int tq, int tk, int tk_cap, int hq, int hkv,
                                int d, int q_offset, int q_stride, int kv_stride) = 0;
  // Inference attention of one sequence over its paged KV cache (engine/kv_pages.h): q, out
  // [tq, hq, d] at positions q_offset .. q_offset + tq - 1, attending keys 0 .. q_offset + i,
  // which lie in the pools k, v ([rows, hkv, d], dense) at the rows `pages` maps them to. q's
  // rows lie q_stride elements apart (hq d when dense), out's are dense. Otherwise as
  // AttentionForward (no lse).
  virtual void PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                                     const KvPageTable& pages, int tq, int hq, int hkv, int d,
                                     int q_offset, int q_stride) = 0;
  // One inference pass's attention over several sequences' paged caches: each segment's rows
  // of k and v ([n, hkv, d], n the rows of all segments; kv_stride elements apart) are written
  // into the pools k_pool, v_pool at their positions, then each segment's rows of q ([n, hq, d],
  // q_stride apart) attend its cache as in PagedAttentionForward, into its rows of out ([n, hq,
  // d], dense). The strides as in AttentionForward (the parts of one [n, (hq + 2 hkv) d] buffer,
  // or dense). The default runs a copy per run of pages (CopyRows with strided k, v) and
  // PagedAttentionForward per segment; a device backend may do all segments at once, so the
  // segments' new rows must go to pool rows no other segment of the pass reads or writes.
  virtual void PagedAttentionPass(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                                  Operand k_pool, Operand v_pool,
                                  const std::vector<PagedRows>& segments, int hq, int hkv, int d,
                                  int q_stride, int kv_stride);
  // Training-path backward (q_offset 0, tq = tk = tk_cap = t) from the forward's out and lse;
  // recomputes the probabilities. dq, dk, dv written in q, k and v's layout: rows of hq or hkv
  // heads, q_stride and kv_stride elements apart, as the forward read q, k, v (what lies between
  // rows is left as it is). dout and out dense; dout has out's dtype; dq, dk, dv have q's.
  virtual void AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout,
                                 ConstOperand out, const float* lse, ConstOperand q, ConstOperand k,
                                 ConstOperand v, int b, int t, int hq, int hkv, int d, int q_stride,
                                 int kv_stride) = 0;

  // ---- softmax cross-entropy ----------------------------------------------------------------
  // For each row r of logits[n, v]: losses[r] = -log softmax(logits[r])[targets[r]] (written,
  // unweighted; rows with weight 0 still get their loss). If max_prob is non-null it gets the
  // max softmax probability of the row. If dlogits.data is non-null it is written with
  // weights[r] * (softmax(logits[r]) - onehot(targets[r])); an fp32 dlogits may alias logits
  // (dlogits is an operand: the head's backward GEMMs read it). With `by_confidence` the row's
  // weight is weights[r] * p (fp32 product), p = the row's max probability as max_prob gets it,
  // a constant of the gradient (confidence-weighted exit losses: one pass, no read-back). logits
  // are fp32, or bf16 where the backend's operands are (the training heads' logits, as the GEMM
  // rounds them); dlogits may alias logits of its dtype.
  virtual void CrossEntropy(float* losses, float* max_prob, Operand dlogits, ConstOperand logits,
                            const int32_t* targets, const float* weights, bool by_confidence, int n,
                            int v) = 0;

  // ---- vocabulary-parallel pieces (tensor parallelism splits the vocabulary) -----------------
  // A rank holds vocabulary rows [start, start + rows) of a table or columns of logits.
  // out[t, :] = table[ids[t] - start, :] for ids in range, zeros otherwise (written).
  virtual void EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n,
                                     int c, int start, int rows) = 0;
  // dtable[ids[t] - start, :] += dout[t, :] for ids in range.
  virtual void EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n,
                                      int c, int start, int rows) = 0;
  // row_max[r] = max_j logits[r, j] over this rank's v columns (written).
  virtual void RowMax(float* row_max, ConstOperand logits, int n, int v) = 0;
  // With the global row maxima m: sum_exp[r] = sum_j exp(logits[r, j] - m[r]) over this rank's
  // columns; target_logit[r] = logits[r, targets[r] - start] when the target is in this rank's
  // range [start, start + v), else 0 (both written; summed over ranks by the caller).
  virtual void SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                               const float* row_max, const int32_t* targets, int n, int v,
                               int start) = 0;
  // With the global m, sum_exp and target logit: losses[r] = log(sum_exp[r]) + m[r] -
  // target_logit[r] (in double, rounded once) and, when max_prob is not null, max_prob[r] =
  // 1 / sum_exp[r], the largest probability (both written).
  virtual void CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                     const float* sum_exp, const float* target_logit, int n) = 0;
  // With the global m and sum_exp: dlogits[r, j] = weights[r] * (exp(logits[r, j] - m[r]) /
  // sum_exp[r] - [start + j == targets[r]]) (written; dlogits may alias logits of its dtype).
  // With `by_confidence` the row's weight is weights[r] * (1 / sum_exp[r]) (both fp32: the max
  // probability CrossEntropyFromStats gives). logits fp32 or bf16, as in CrossEntropy.
  virtual void CrossEntropyGradRange(Operand dlogits, ConstOperand logits, const float* row_max,
                                     const float* sum_exp, const int32_t* targets,
                                     const float* weights, bool by_confidence, int n, int v,
                                     int start) = 0;

  // ---- parameters ---------------------------------------------------------------------------
  // [p, p + n) holds fp32 parameters (master weights) until UnregisterWeights(p): a backend may
  // keep a lower-precision copy of them for its GEMMs. It sees writes made through its own ops;
  // writes it cannot see (a communicator filling device memory directly) are announced with
  // WeightsChanged(first, n), the n parameters from `first` on. Defaults: nothing kept.
  virtual void RegisterWeights(const float* p, size_t n) {
    (void)p;
    (void)n;
  }
  virtual void UnregisterWeights(const float* p) { (void)p; }
  virtual void WeightsChanged(const float* first, size_t n) {
    (void)first;
    (void)n;
  }

  // ---- optimizer ----------------------------------------------------------------------------
  // AdamW on one fp32 tensor: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  // p -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), with bias correction for
  // `step` (1-based).
  virtual void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
                     float beta2, float eps, float weight_decay, int step) = 0;
  // AdamW on several runs of one arena at once (a multi-tensor update: one launch on a GPU where a
  // model has a run per tensor between its norms and biases): run r covers elements
  // [offset, offset + count) of p, g, m and v, with weight_decay where `decay`, else 0. The same
  // arithmetic as AdamW per run, which is what it does by default.
  struct AdamWRun {
    size_t offset = 0, count = 0;
    bool decay = false;
    bool operator==(const AdamWRun& o) const {
      return offset == o.offset && count == o.count && decay == o.decay;
    }
  };
  virtual void AdamWRuns(float* p, const float* g, float* m, float* v,
                         const std::vector<AdamWRun>& runs, float lr, float beta1, float beta2,
                         float eps, float weight_decay, int step);
};

// Host fp32 copies of operands (bf16 ones converted): for tests and host-side reads.
void OperandToHost(Backend* be, float* host, ConstOperand src, size_t n);
void OperandFromHost(Backend* be, Operand dst, const float* host, size_t n);

// Rows of `row_bytes` between a paged pool and contiguous memory (both on the backend), one Copy
// per run of adjacent pool rows: positions [first, first + count) of `pages` from `src` rows
// into the pool, or out of it into `dst`. CopyToPages' source rows lie src_stride bytes apart
// (row_bytes: contiguous; otherwise a CopyRows per run).
void CopyToPages(Backend* be, void* pool, const KvPageTable& pages, int first, int count,
                 const void* src, size_t row_bytes, size_t src_stride);
void CopyFromPages(Backend* be, void* dst, const void* pool, const KvPageTable& pages, int first,
                   int count, size_t row_bytes);
// PagedAttentionForward by gathering the keys and values in position order into k_buf, v_buf
// (backend memory of buf_tokens >= q_offset + tq rows each), then AttentionForward: for backends
// without a kernel that reads through the page table.
void GatheredPagedAttention(Backend* be, Operand out, ConstOperand q, ConstOperand k,
                            ConstOperand v, const KvPageTable& pages, int tq, int hq, int hkv,
                            int d, int q_offset, int q_stride, void* k_buf, void* v_buf,
                            int buf_tokens);

// The attention sizes every backend accepts (see AttentionForward); aborts naming them otherwise.
// The backward's training form is tq = tk = tk_cap = t, q_offset = 0.
void CheckAttentionSizes(int tq, int tk, int tk_cap, int hq, int hkv, int q_offset);
// Fails unless q's and k, v's row strides hold their heads (AttentionForward / Backward).
void CheckAttentionStrides(int hq, int hkv, int d, int q_stride, int kv_stride);
// Fails unless head_dim is even and stride >= heads * head_dim (RopeForward / RopeBackward).
void CheckRopeShape(int heads, int head_dim, int stride);
// Fails unless rows, cols >= 0 and stride >= cols (SwiGluForward / SwiGluBackward).
void CheckSwiGluShape(int rows, int cols, int stride);

// "cpu" (always), or "cuda" (fp32) / "cuda-bf16" (bf16 tensor-core GEMMs) / "cuda-bf16w" (the
// same with bf16 copies of the weights and bf16-converted activations as GEMM operands), optionally
// with
// ":<device>" (when built with CUDA and a GPU is present; the device index is taken modulo the
// number of GPUs, so ranks may pass their local rank).
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name);

}  // namespace eellm
