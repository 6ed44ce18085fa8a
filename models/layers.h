// Transformer layer family with explicit forward/backward on the Backend: norms (LayerNorm or
// RMSNorm), the attention branch (GQA, RoPE or not, optional KV cache), the MLP branch (GELU or
// SwiGLU) and the pre-norm block x -> h = x + attn(norm1(x)) -> out = h + mlp(norm2(h)).
// Shapes: n = rows (tokens), c = hidden, f = ffn hidden, hq/hkv heads of size d.
// Backward functions ACCUMULATE into dx and parameter gradients.
#pragma once

#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/tensor/param_store.h"
#include "models/model_config.h"
#include "models/sequence_parallel.h"
#include "parallel/comm/communicator.h"

namespace eellm {

// Owns activation/scratch buffers; hands out fp32 arrays, and GEMM operands (and their
// gradients) in the backend's operand dtype. Allocation happens at setup only.
class Arena {
 public:
  explicit Arena(Backend* be) : be_(be) {}
  float* Floats(size_t n);
  Operand Operands(size_t n);
  int32_t* Ints(size_t n);
  size_t bytes() const;  // of every buffer so far

 private:
  Backend* be_;
  std::vector<Buffer> buffers_;
};

struct NormParams {
  int g = -1, b = -1;  // b = -1 for RMSNorm
};
struct AttnParams {
  NormParams norm;
  int wq = -1, bq = -1, wk = -1, bk = -1, wv = -1, bv = -1, wo = -1, bo = -1;
  int q_norm = -1, k_norm = -1;  // [d] RMSNorm gains of every q and k head (qk_norm)
};
struct MlpParams {
  NormParams norm;
  int w1 = -1, b1 = -1;  // fc1 [f, c] (GPT) or gate [f, c] (Llama)
  int w3 = -1;           // up [f, c] (Llama only)
  int w2 = -1, b2 = -1;  // fc2 [c, f]
};
struct BlockParams {
  AttnParams attn;
  MlpParams mlp;
};

// Declares parameters under `prefix` (e.g. "layers.3.") and returns their indices.
NormParams AddNormParams(ParamStore& ps, const ModelConfig& c, const std::string& name);
MlpParams AddMlpParams(ParamStore& ps, const ModelConfig& c, const std::string& prefix);
BlockParams AddBlockParams(ParamStore& ps, const ModelConfig& c, const std::string& prefix);

struct NormActs {
  Operand out;            // [n, c] (the next GEMM's input)
  float* mean = nullptr;  // [n] (LayerNorm only)
  float* rstd = nullptr;  // [n]
};
struct AttnActs {
  NormActs norm;
  // q, k, v (after RoPE): rows of hq d, hkv d and hkv d elements, q_stride and kv_stride apart,
  // in `qkv` ([n (hq + 2 hkv) d]): the parts of [n, (hq + 2 hkv) d] rows (`fused`) when one GEMM
  // projected them (layers.cc, QkvFused and QkvLayout), else three dense blocks.
  // Set by each forward; the backward writes dq, dk, dv in the same layout.
  Operand qkv, q, k, v;
  int q_stride = 0, kv_stride = 0;
  bool fused = false;
  float* lse = nullptr;  // [b, hq, t] (training only)
  // qk_norm: q and k as projected (fp32), and each head's 1/rms.
  float *q_raw = nullptr, *k_raw = nullptr, *q_rstd = nullptr, *k_rstd = nullptr;
  Operand att;  // [n, hq*d]
};
struct MlpActs {
  NormActs norm;
  // GELU: [n, f], fc1's pre-activation. SwiGLU: [2 n f], the gate and up projections: the
  // halves of [n, 2f] rows when one GEMM computes both, or two [n, f] blocks (layers.cc, GateUp).
  Operand h1;
  Operand act;  // [n, f]
};
struct BlockActs {
  AttnActs attn;
  float* h_attn = nullptr;  // [n, c] residual after attention
  MlpActs mlp;
  float* out = nullptr;  // [n, c]
};

// Gradient scratch shared by all layers' backward passes (sized for n rows). dnorm (summed over
// several GEMMs) and dh (the residual stream's) are fp32; the others are operands: written by one
// backward op and read by the next GEMM or attention backward (dact: SwiGLU only; dh1 has h1's
// size and layout).
struct GradScratch {
  float *dnorm, *dh;
  Operand dqkv;  // dq, dk, dv: laid out as the forward laid out q, k, v (layers.cc, QkvLayout)
  Operand datt, dact, dh1;
  // qk_norm: the gradients at the projections' outputs, and dq, dk widened to fp32.
  float *dq_raw = nullptr, *dk_raw = nullptr, *dq_f32 = nullptr, *dk_f32 = nullptr;
  float* ddrop = nullptr;  // hidden dropout: a branch output's gradient through the mask
};

// `local`: the rows of the residual stream and the norms (n / tp under sequence parallelism;
// -1: n); the branches' activations take n.
NormActs MakeNormActs(Arena& a, int n, int c);
MlpActs MakeMlpActs(Arena& a, const ModelConfig& c, int n, int local = -1);
// The attention log-sum-exps the backward needs are allocated only when `training`.
BlockActs MakeBlockActs(Arena& a, const ModelConfig& c, int n, bool training, int local = -1);
// `dropout`: with hidden dropout's scratch.
GradScratch MakeGradScratch(Arena& a, const ModelConfig& c, int n, bool dropout = false);

// One sequence's KV cache of one layer: k, v are the layer's pools [rows, hkv, d] (in the
// operand dtype), shared by the sequences, and `pages` maps the sequence's positions to their
// rows (engine/kv_pages.h).
struct KvLayer {
  Operand k;
  Operand v;
  const KvPageTable* pages = nullptr;
};

// One sequence's rows in an inference pass over several sequences: rows [row, row + rows) of
// the pass sit at positions q_offset .. q_offset + rows - 1 of the sequence whose cache is `kv`.
struct KvSegment {
  KvLayer* kv = nullptr;
  int row = 0;
  int rows = 0;
  int q_offset = 0;
};

// This rank's place in the tensor-parallel group (size 1: no tensor parallelism). Attention
// heads and FFN columns are split column-parallel into the branch and row-parallel out of it:
// partial outputs are all-reduced in the forward, partial input gradients in the backward.
struct TpSpec {
  int rank = 0;
  int size = 1;
  Communicator* comm = nullptr;
  // Training only (models/sequence_parallel.h): the residual stream holds this rank's block of
  // n / size rows; layer functions keep taking the whole batch's n rows.
  bool sequence_parallel = false;
};

// Hidden dropout of a training pass (Megatron's --hidden-dropout; engine/core/dropout.h): each
// branch output (bias included) is dropped before its residual add, with the key of the layer or
// exit (`key`) and the rows numbered from `row0` (the first row's global number: its sample's
// index times the sequence length plus its position). p = 0: none (evaluation, inference).
struct DropoutSpec {
  float p = 0;
  uint64_t key = 0;
  int64_t row0 = 0;
};

struct LayerContext {
  Backend* be;
  const ModelConfig* cfg;  // the local config (LocalConfig) under tensor parallelism
  ParamStore* ps;
  TpSpec tp;
  const SpScratch* sp = nullptr;  // with tp.sequence_parallel
  DropoutSpec drop = {};
  bool dropout() const { return drop.p > 0; }
  bool seq_parallel() const { return tp.sequence_parallel && tp.size > 1; }
  // Rows of the residual stream (and of the norms) this rank holds of a batch of n.
  int LocalRows(int n) const { return seq_parallel() ? n / tp.size : n; }
  const float* P(int i) const { return i < 0 ? nullptr : ps->param(i); }
  float* G(int i) const { return i < 0 ? nullptr : ps->grad(i); }
};

void NormForward(const LayerContext& ctx, const NormParams& p, NormActs& a, const float* x, int n);
// dx = dres + d/dx of norm(x) given dout (dres may alias dx, or be null); parameter gradients
// accumulate.
void NormBackward(const LayerContext& ctx, const NormParams& p, const NormActs& a, float* dx,
                  const float* dres, const float* dout, const float* x, int n);

// out = x + mlp(norm(x)) (out written; may not alias x).
void MlpForward(const LayerContext& ctx, const MlpParams& p, MlpActs& a, float* out, const float* x,
                int n);
// dx = dres + d/dx of the branch mlp(norm(x)) given dout (dres: the gradient reaching x by
// other paths, e.g. the residual; it may alias dx, or be null).
void MlpBranchBackward(const LayerContext& ctx, const MlpParams& p, const MlpActs& a, float* dx,
                       const float* dres, const float* dout, const float* x, int n,
                       const GradScratch& s);

// Block forward over n = b*t rows at positions pos[n].
// Training (cache == nullptr): tokens are b sequences of t, attention causal within each.
// Inference (cache != nullptr, b = 1): the segments cover the n rows in order, one per sequence;
// each segment's K/V are written into its sequence's cache, and its attention reads that cache
// (keys 0 .. q_offset + rows - 1). The GEMMs and norms run over all n rows at once.
void BlockForward(const LayerContext& ctx, const BlockParams& p, BlockActs& a, const float* x,
                  const int32_t* pos, int b, int t, const std::vector<KvSegment>* cache);
// dx written with d/dx; d_h_attn_extra (may be null) is added to the gradient at h_attn
// (MLP-branch exits read h_attn). dx may not alias dout.
void BlockBackward(const LayerContext& ctx, const BlockParams& p, const BlockActs& a, float* dx,
                   const float* dout, const float* d_h_attn_extra, const float* x,
                   const int32_t* pos, int b, int t, const GradScratch& s);

}  // namespace eellm
