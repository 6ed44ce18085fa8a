#include "models/layers.h"

#include <cmath>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/core/dropout.h"
#include "engine/core/status.h"
#include "parallel/tensor_parallel.h"

namespace eellm {

float* Arena::Floats(size_t n) {
  buffers_.emplace_back(be_, std::max<size_t>(n, 1) * sizeof(float));
  return buffers_.back().f32();
}

Operand Arena::Operands(size_t n) {
  const DType t = be_->operand_dtype();
  buffers_.emplace_back(be_, std::max<size_t>(n, 1) * DTypeSize(t));
  return Operand(buffers_.back().data(), t);
}

size_t Arena::bytes() const {
  size_t total = 0;
  for (const Buffer& b : buffers_) total += b.bytes();
  return total;
}

int32_t* Arena::Ints(size_t n) {
  buffers_.emplace_back(be_, std::max<size_t>(n, 1) * sizeof(int32_t));
  return static_cast<int32_t*>(buffers_.back().data());
}

NormParams AddNormParams(ParamStore& ps, const ModelConfig& c, const std::string& name) {
  NormParams p;
  p.g = ps.Add(name + ".weight", {c.hidden_size}, false);
  if (!c.use_rmsnorm()) p.b = ps.Add(name + ".bias", {c.hidden_size}, false);
  return p;
}

namespace {
// `split`: 0 = column-parallel (output rows split over tp; bias split too), 1 = row-parallel
// (input columns split; bias whole). Only recorded when the config is a tensor-parallel one.
int AddBias(ParamStore& ps, const ModelConfig& c, const std::string& name, int out, int split) {
  const int b = ps.Add(name + ".bias", {out}, false);
  if (c.tp_size > 1 && split == 0) ps.mutable_params()[b].split_dim = 0;
  return b;
}
void AddLinear(ParamStore& ps, const ModelConfig& c, const std::string& name, int out, int in,
               int* w, int* b, int split, bool bias) {
  *w = ps.Add(name + ".weight", {out, in}, true);
  if (c.tp_size > 1) ps.mutable_params()[*w].split_dim = split;
  if (bias && b) *b = AddBias(ps, c, name, out, split);
}

// Row-parallel bias: added by tensor-parallel rank 0 only, before the all-reduce.
const float* RowParallelBias(const LayerContext& ctx, int b) {
  return ctx.tp.rank == 0 ? ctx.P(b) : nullptr;
}

// out = x + partial (all-reduced over tp) where out already holds the rank's partial output.
void AddReducedResidual(const LayerContext& ctx, float* out, const float* x, size_t n) {
  TpAllReduce(ctx.tp.comm, out, n);
  ctx.be->Add(out, out, x, n);
}

// The GEMM input of a branch: the norm's output, gathered over the group under sequence
// parallelism (the norm ran on this rank's `rows` rows).
ConstOperand BranchInput(const LayerContext& ctx, ConstOperand norm_out, int rows) {
  if (!ctx.seq_parallel()) return norm_out;
  return GatherRows(ctx.be, ctx.tp.comm, *ctx.sp, norm_out, rows, ctx.cfg->hidden_size);
}

// Hidden dropout of branch `site` (0: attention, 1: MLP) of this context's layer: its key, and
// the global number of the first row this rank drops (its own rows under sequence parallelism).
uint64_t SiteKey(const LayerContext& ctx, int site) {
  return DropoutMix(ctx.drop.key ^ static_cast<uint64_t>(0x5e00 + site));
}
int64_t DropRow0(const LayerContext& ctx, int rows) {
  return ctx.drop.row0 + (ctx.seq_parallel() ? int64_t{ctx.tp.rank} * rows : 0);
}

// The gradient at a branch's output over all n rows (gathered from this rank's `rows` under
// sequence parallelism), through branch `site`'s dropout mask (into s.ddrop).
const float* BranchOutputGrad(const LayerContext& ctx, const float* dout, int rows, int site,
                              const GradScratch& s) {
  if (ctx.dropout()) {
    EE_CHECK(s.ddrop != nullptr, "hidden dropout set after the workspace was made");
    ctx.be->DropoutBackward(s.ddrop, dout, rows, ctx.cfg->hidden_size, ctx.drop.p,
                            SiteKey(ctx, site), DropRow0(ctx, rows));
    dout = s.ddrop;
  }
  if (!ctx.seq_parallel()) return dout;
  return GatherGradRows(ctx.tp.comm, *ctx.sp, dout, rows, ctx.cfg->hidden_size);
}

// out = x + the branch's row-parallel output projection of `in` [n, k] by w [c, k] (+ bias):
// partial sums over tp all-reduced, or under sequence parallelism reduce-scattered to this
// rank's `rows` rows. With dropout, the branch `site`'s output is dropped before the add.
void RowParallelResidual(const LayerContext& ctx, float* out, const float* x, ConstOperand in,
                         int w, int bias, int n, int k, int rows, int site) {
  const int c = ctx.cfg->hidden_size;
  Backend* be = ctx.be;
  if (ctx.dropout()) {  // the branch output alone in `out`, then dropped and added to x
    if (ctx.seq_parallel()) {
      be->Linear(ctx.sp->full, in, ctx.P(w), RowParallelBias(ctx, bias), n, k, c, false);
      ReduceScatterRows(ctx.tp.comm, ctx.sp->full, out, rows, c);
    } else {
      be->Linear(out, in, ctx.P(w), RowParallelBias(ctx, bias), n, k, c, false);
      if (ctx.tp.size > 1) TpAllReduce(ctx.tp.comm, out, static_cast<size_t>(n) * c);
    }
    be->DropoutAdd(out, x, out, rows, c, ctx.drop.p, SiteKey(ctx, site), DropRow0(ctx, rows));
  } else if (ctx.seq_parallel()) {
    be->Linear(ctx.sp->full, in, ctx.P(w), RowParallelBias(ctx, bias), n, k, c, false);
    ReduceScatterRows(ctx.tp.comm, ctx.sp->full, out, rows, c);
    be->Add(out, out, x, static_cast<size_t>(rows) * c);
  } else if (ctx.tp.size > 1) {
    be->Linear(out, in, ctx.P(w), RowParallelBias(ctx, bias), n, k, c, false);
    AddReducedResidual(ctx, out, x, static_cast<size_t>(n) * c);
  } else {
    be->LinearResidual(out, x, in, ctx.P(w), ctx.P(bias), n, k, c);
  }
}

// dx = dres + the norm's backward of the branch input's gradient `dnorm` [n, c] (partial over
// tp: all-reduced, or reduce-scattered to this rank's `rows` under sequence parallelism).
void BranchInputBackward(const LayerContext& ctx, const NormParams& p, const NormActs& a, float* dx,
                         const float* dres, float* dnorm, const float* x, int n, int rows) {
  const int c = ctx.cfg->hidden_size;
  if (ctx.seq_parallel()) {
    ReduceScatterRows(ctx.tp.comm, dnorm, ctx.sp->local, rows, c);
    NormBackward(ctx, p, a, dx, dres, ctx.sp->local, x, rows);
    return;
  }
  TpAllReduce(ctx.tp.comm, dnorm, static_cast<size_t>(n) * c);
  NormBackward(ctx, p, a, dx, dres, dnorm, x, n);
}

// qk_norm's backward over `rows` heads: dx (fp32) from dout (in the operand dtype, widened into
// `widened` when bf16, since the norm's backward reads fp32) through the RMSNorm of x with gain
// `gain`, whose gradient accumulates.
void HeadNormBackward(const LayerContext& ctx, int gain, const float* x, const float* rstd,
                      ConstOperand dout, float* widened, float* dx, int rows) {
  const int d = ctx.cfg->head_dim();
  if (dout.is_bf16()) ctx.be->ToFloat(widened, dout, static_cast<size_t>(rows) * d);
  const float* dout32 = dout.is_bf16() ? widened : dout.f32();
  ctx.be->RmsNormBackward(dx, nullptr, ctx.G(gain), dout32, x, ctx.P(gain), rstd, rows, d);
}

// EELLM_FUSED_PROJECTIONS=0 keeps every projection its own GEMM (to time both in one command).
bool FusedProjections() {
  static const bool on = [] {
    const char* env = std::getenv("EELLM_FUSED_PROJECTIONS");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

// Whether the tensors `ids` lie one after another in the parameter arena, and in the gradient
// arena or all without gradients: then one GEMM over their concatenated rows does the work of
// one GEMM per tensor.
bool Consecutive(const LayerContext& ctx, std::initializer_list<int> ids) {
  const std::vector<ParamInfo>& info = ctx.ps->params();
  int prev = -1;
  for (int i : ids) {
    if (i < 0) return false;
    if (prev >= 0 && (info[i].offset != info[prev].offset + info[prev].numel ||
                      (ctx.G(prev) == nullptr) != (ctx.G(i) == nullptr))) {
      return false;
    }
    prev = i;
  }
  return true;
}

// Whether one GEMM projects q, k and v (and one GEMM takes their gradients back): their weights,
// and their biases if any, lie one after another in the arena and no q and k norms come between.
// Then q, k, v are the parts of [n, (hq + 2 hkv) d] rows, RoPE rotates q and k in one call, and
// in the backward dq, dk, dv are the same parts of GradScratch's rows, RoPE's backward rotates dq
// and dk in one call, and one GEMM takes all three to the norm's input gradient (written once,
// not read and rewritten by two more GEMMs).
bool QkvFused(const LayerContext& ctx, const AttnParams& p) {
  const bool biases = p.bq >= 0 || p.bk >= 0 || p.bv >= 0;
  return FusedProjections() && !ctx.cfg->qk_norm && Consecutive(ctx, {p.wq, p.wk, p.wv}) &&
         (!biases || Consecutive(ctx, {p.bq, p.bk, p.bv}));
}

// q, k, v (or dq, dk, dv) in `buf` (n (hq + 2 hkv) d elements): the parts of [n, (hq + 2 hkv) d]
// rows when `fused`, else three dense blocks.
struct Qkv {
  Operand q, k, v;
  int q_stride, kv_stride;
};
Qkv QkvLayout(const ModelConfig& c, Operand buf, int n, bool fused) {
  const int d = c.head_dim(), q = c.num_heads * d, kv = c.num_kv_heads * d;
  if (fused) return {buf, buf.At(q), buf.At(q + kv), q + 2 * kv, q + 2 * kv};
  const size_t nq = static_cast<size_t>(n) * q, nkv = static_cast<size_t>(n) * kv;
  return {buf, buf.At(nq), buf.At(nq + nkv), q, kv};
}

// Points the acts' q, k, v into their buffer in the layout `fused` chooses.
void LayOutQkv(AttnActs& at, const ModelConfig& c, int n, bool fused) {
  const Qkv x = QkvLayout(c, at.qkv, n, fused);
  at.fused = fused;
  at.q = x.q;
  at.k = x.k;
  at.v = x.v;
  at.q_stride = x.q_stride;
  at.kv_stride = x.kv_stride;
}

// SwiGLU's gate and up projections (h1 and dh1, 2 n f elements). One GEMM of 2f outputs when
// their weights are consecutive (fc1 then up, no bias: Llama configs whose f c is a multiple of
// 16, the arena's alignment): rows [gate | up], stride 2f. Otherwise two GEMMs into the
// buffer's halves, [n, f] each (stride f).
struct GateUp {
  Operand gate, up;
  int stride;
  bool fused;
};
GateUp GateUpLayout(const LayerContext& ctx, const MlpParams& p, Operand buf, int n) {
  const int f = ctx.cfg->ffn_hidden_size;
  if (FusedProjections() && p.b1 < 0 && Consecutive(ctx, {p.w1, p.w3}))
    return {buf, buf.At(f), 2 * f, true};
  return {buf, buf.At(static_cast<size_t>(n) * f), f, false};
}

}  // namespace

MlpParams AddMlpParams(ParamStore& ps, const ModelConfig& c, const std::string& prefix) {
  MlpParams p;
  p.norm = AddNormParams(ps, c, prefix + "mlp_norm");
  const bool b = c.use_bias();
  AddLinear(ps, c, prefix + "mlp.fc1", c.ffn_hidden_size, c.hidden_size, &p.w1, &p.b1, 0, b);
  if (c.use_swiglu())
    AddLinear(ps, c, prefix + "mlp.up", c.ffn_hidden_size, c.hidden_size, &p.w3, nullptr, 0, b);
  AddLinear(ps, c, prefix + "mlp.fc2", c.hidden_size, c.ffn_hidden_size, &p.w2, &p.b2, 1, b);
  return p;
}

BlockParams AddBlockParams(ParamStore& ps, const ModelConfig& c, const std::string& prefix) {
  BlockParams p;
  const int d = c.head_dim(), q = c.num_heads * d, kv = c.num_kv_heads * d;
  p.attn.norm = AddNormParams(ps, c, prefix + "attn_norm");
  // The three weights, then the three biases: each group one after another in the arena, so one
  // GEMM can project q, k and v and take their gradients (QkvFused).
  AddLinear(ps, c, prefix + "attn.wq", q, c.hidden_size, &p.attn.wq, nullptr, 0, false);
  AddLinear(ps, c, prefix + "attn.wk", kv, c.hidden_size, &p.attn.wk, nullptr, 0, false);
  AddLinear(ps, c, prefix + "attn.wv", kv, c.hidden_size, &p.attn.wv, nullptr, 0, false);
  if (c.use_qkv_bias()) {
    p.attn.bq = AddBias(ps, c, prefix + "attn.wq", q, 0);
    p.attn.bk = AddBias(ps, c, prefix + "attn.wk", kv, 0);
    p.attn.bv = AddBias(ps, c, prefix + "attn.wv", kv, 0);
  }
  if (c.kv_replicas > 1) {  // llama only (with qkv_bias, K and V biases replicated alike)
    for (int i : {p.attn.wk, p.attn.wv, p.attn.bk, p.attn.bv}) {
      if (i >= 0) ps.mutable_params()[i].tp_replicas = c.kv_replicas;
    }
  }
  AddLinear(ps, c, prefix + "attn.wo", c.hidden_size, q, &p.attn.wo, &p.attn.bo, 1, c.use_bias());
  if (c.qk_norm) {
    p.attn.q_norm = ps.Add(prefix + "attn.q_norm.weight", {d}, false);
    p.attn.k_norm = ps.Add(prefix + "attn.k_norm.weight", {d}, false);
    for (int i : {p.attn.q_norm, p.attn.k_norm}) ps.mutable_params()[i].sum_grad_over_tp = true;
  }
  p.mlp = AddMlpParams(ps, c, prefix);
  return p;
}

NormActs MakeNormActs(Arena& a, int n, int c) {
  NormActs r;
  r.out = a.Operands(static_cast<size_t>(n) * c);
  r.mean = a.Floats(n);
  r.rstd = a.Floats(n);
  return r;
}

MlpActs MakeMlpActs(Arena& a, const ModelConfig& c, int n, int local) {
  MlpActs r;
  const size_t nf = static_cast<size_t>(n) * c.ffn_hidden_size;
  r.norm = MakeNormActs(a, local < 0 ? n : local, c.hidden_size);
  r.h1 = a.Operands(c.use_swiglu() ? 2 * nf : nf);
  r.act = a.Operands(nf);
  return r;
}

BlockActs MakeBlockActs(Arena& a, const ModelConfig& c, int n, bool training, int local) {
  BlockActs r;
  const int d = c.head_dim();
  if (local < 0) local = n;
  r.attn.norm = MakeNormActs(a, local, c.hidden_size);
  r.attn.qkv = a.Operands(static_cast<size_t>(n) * (c.num_heads + 2 * c.num_kv_heads) * d);
  LayOutQkv(r.attn, c, n, false);
  if (training) r.attn.lse = a.Floats(static_cast<size_t>(n) * c.num_heads);
  r.attn.att = a.Operands(static_cast<size_t>(n) * c.num_heads * d);
  if (c.qk_norm) {
    r.attn.q_raw = a.Floats(static_cast<size_t>(n) * c.num_heads * d);
    r.attn.k_raw = a.Floats(static_cast<size_t>(n) * c.num_kv_heads * d);
    r.attn.q_rstd = a.Floats(static_cast<size_t>(n) * c.num_heads);
    r.attn.k_rstd = a.Floats(static_cast<size_t>(n) * c.num_kv_heads);
  }
  r.h_attn = a.Floats(static_cast<size_t>(local) * c.hidden_size);
  r.mlp = MakeMlpActs(a, c, n, local);
  r.out = a.Floats(static_cast<size_t>(local) * c.hidden_size);
  return r;
}

GradScratch MakeGradScratch(Arena& a, const ModelConfig& c, int n, bool dropout) {
  GradScratch s;
  const size_t nc = static_cast<size_t>(n) * c.hidden_size;
  const size_t nq = static_cast<size_t>(n) * c.num_heads * c.head_dim();
  const size_t nkv = static_cast<size_t>(n) * c.num_kv_heads * c.head_dim();
  const size_t nf = static_cast<size_t>(n) * c.ffn_hidden_size;
  s.dnorm = a.Floats(nc);
  s.dh = a.Floats(nc);
  if (dropout) s.ddrop = a.Floats(nc);
  if (c.qk_norm) {
    s.dq_raw = a.Floats(nq);
    s.dk_raw = a.Floats(nkv);
    s.dq_f32 = a.Floats(nq);
    s.dk_f32 = a.Floats(nkv);
  }
  s.dqkv = a.Operands(nq + 2 * nkv);
  s.datt = a.Operands(nq);
  // A GELU MLP's backward goes from dout to dh1 in one op.
  if (c.use_swiglu()) s.dact = a.Operands(nf);
  s.dh1 = a.Operands(c.use_swiglu() ? 2 * nf : nf);
  return s;
}

void NormForward(const LayerContext& ctx, const NormParams& p, NormActs& a, const float* x, int n) {
  const int c = ctx.cfg->hidden_size;
  if (ctx.cfg->use_rmsnorm()) {
    ctx.be->RmsNormForward(a.out, a.rstd, x, ctx.P(p.g), n, c, ctx.cfg->norm_eps);
  } else {
    ctx.be->LayerNormForward(a.out, a.mean, a.rstd, x, ctx.P(p.g), ctx.P(p.b), n, c,
                             ctx.cfg->norm_eps);
  }
}

void NormBackward(const LayerContext& ctx, const NormParams& p, const NormActs& a, float* dx,
                  const float* dres, const float* dout, const float* x, int n) {
  const int c = ctx.cfg->hidden_size;
  if (ctx.cfg->use_rmsnorm()) {
    ctx.be->RmsNormBackward(dx, dres, ctx.G(p.g), dout, x, ctx.P(p.g), a.rstd, n, c);
  } else {
    ctx.be->LayerNormBackward(dx, dres, ctx.G(p.g), ctx.G(p.b), dout, x, ctx.P(p.g), a.mean, a.rstd,
                              n, c);
  }
}

void MlpForward(const LayerContext& ctx, const MlpParams& p, MlpActs& a, float* out, const float* x,
                int n) {
  const ModelConfig& c = *ctx.cfg;
  const int h = c.hidden_size, f = c.ffn_hidden_size;
  Backend* be = ctx.be;
  const int rows = ctx.LocalRows(n);
  NormForward(ctx, p.norm, a.norm, x, rows);
  const ConstOperand in = BranchInput(ctx, a.norm.out, rows);
  if (c.use_swiglu()) {
    const GateUp gu = GateUpLayout(ctx, p, a.h1, n);
    if (gu.fused) {
      be->Linear(gu.gate, in, ctx.P(p.w1), nullptr, n, h, 2 * f, false);
    } else {
      be->Linear(gu.gate, in, ctx.P(p.w1), ctx.P(p.b1), n, h, f, false);
      be->Linear(gu.up, in, ctx.P(p.w3), nullptr, n, h, f, false);
    }
    be->SwiGluForward(a.act, gu.gate, gu.up, n, f, gu.stride);
  } else {
    be->LinearGelu(a.act, a.h1, in, ctx.P(p.w1), ctx.P(p.b1), n, h, f);
  }
  RowParallelResidual(ctx, out, x, a.act, p.w2, p.b2, n, f, rows, 1);  // fc2
}

void MlpBranchBackward(const LayerContext& ctx, const MlpParams& p, const MlpActs& a, float* dx,
                       const float* dres, const float* dout, const float* x, int n,
                       const GradScratch& s) {
  const ModelConfig& c = *ctx.cfg;
  const int h = c.hidden_size, f = c.ffn_hidden_size;
  const int rows = ctx.LocalRows(n);
  Backend* be = ctx.be;
  const float* dout_all = BranchOutputGrad(ctx, dout, rows, 1, s);
  const ConstOperand in = BranchInput(ctx, a.norm.out, rows);  // gathered again
  if (c.use_swiglu()) {
    // dact = dout @ w2; dw2 += dout^T act.
    be->LinearBackward(s.dact, ctx.G(p.w2), ctx.G(p.b2), dout_all, a.act, ctx.P(p.w2), n, f, h,
                       false);
    const GateUp gu = GateUpLayout(ctx, p, a.h1, n), dgu = GateUpLayout(ctx, p, s.dh1, n);
    be->SwiGluBackward(dgu.gate, dgu.up, s.dact, gu.gate, gu.up, n, f, gu.stride);
    if (gu.fused) {  // dnorm written once, from all 2f columns
      be->LinearBackward(s.dnorm, ctx.G(p.w1), nullptr, dgu.gate, in, ctx.P(p.w1), n, h, 2 * f,
                         false);
    } else {
      be->LinearBackward(s.dnorm, ctx.G(p.w1), ctx.G(p.b1), dgu.gate, in, ctx.P(p.w1), n, h, f,
                         false);
      be->LinearBackward(s.dnorm, ctx.G(p.w3), nullptr, dgu.up, in, ctx.P(p.w3), n, h, f, true);
    }
  } else {
    // dh1 = gelu'(h1) * (dout @ w2); dw2 += dout^T act.
    be->LinearBackwardGelu(s.dh1, ctx.G(p.w2), ctx.G(p.b2), dout_all, a.act, a.h1, ctx.P(p.w2), n,
                           f, h);
    be->LinearBackward(s.dnorm, ctx.G(p.w1), ctx.G(p.b1), s.dh1, in, ctx.P(p.w1), n, h, f, false);
  }
  // Column-parallel input: each rank's dnorm covers its FFN columns only.
  BranchInputBackward(ctx, p.norm, a.norm, dx, dres, s.dnorm, x, n, rows);
}

void BlockForward(const LayerContext& ctx, const BlockParams& p, BlockActs& a, const float* x,
                  const int32_t* pos, int b, int t, const std::vector<KvSegment>* cache) {
  const ModelConfig& c = *ctx.cfg;
  const int h = c.hidden_size, d = c.head_dim(), hq = c.num_heads, hkv = c.num_kv_heads;
  const int n = b * t;
  Backend* be = ctx.be;
  AttnActs& at = a.attn;
  EE_CHECK(!ctx.seq_parallel() || cache == nullptr, "sequence parallelism is for training");
  const int rows = ctx.LocalRows(n);
  NormForward(ctx, p.attn.norm, at.norm, x, rows);
  const ConstOperand in = BranchInput(ctx, at.norm.out, rows);
  LayOutQkv(at, c, n, QkvFused(ctx, p.attn));
  if (at.fused) {
    be->Linear(at.q, in, ctx.P(p.attn.wq), ctx.P(p.attn.bq), n, h, at.q_stride, false);
  } else {
    // qk_norm: q and k projected in fp32, then each head normalized into the operands.
    const Operand q_out = c.qk_norm ? Operand(at.q_raw) : at.q;
    const Operand k_out = c.qk_norm ? Operand(at.k_raw) : at.k;
    be->Linear(q_out, in, ctx.P(p.attn.wq), ctx.P(p.attn.bq), n, h, hq * d, false);
    be->Linear(k_out, in, ctx.P(p.attn.wk), ctx.P(p.attn.bk), n, h, hkv * d, false);
    be->Linear(at.v, in, ctx.P(p.attn.wv), ctx.P(p.attn.bv), n, h, hkv * d, false);
  }
  if (c.qk_norm) {
    be->RmsNormForward(at.q, at.q_rstd, at.q_raw, ctx.P(p.attn.q_norm), n * hq, d, c.norm_eps);
    be->RmsNormForward(at.k, at.k_rstd, at.k_raw, ctx.P(p.attn.k_norm), n * hkv, d, c.norm_eps);
  }
  if (c.use_rope()) {
    if (at.fused) {  // the heads of q and k, side by side in each row
      be->RopeForward(at.q, pos, n, hq + hkv, d, at.q_stride, c.rope());
    } else {
      be->RopeForward(at.q, pos, n, hq, d, at.q_stride, c.rope());
      be->RopeForward(at.k, pos, n, hkv, d, at.kv_stride, c.rope());
    }
  }
  if (cache == nullptr) {
    be->AttentionForward(at.att, at.lse, at.q, at.k, at.v, b, t, t, t, hq, hkv, d, 0, at.q_stride,
                         at.kv_stride);
  } else {
    EE_CHECK(b == 1, "inference passes run b = 1, got ", b);
    EE_CHECK(!cache->empty(), "an inference pass without KV segments");
    // Every segment's cache lies in the same pools (the layer's), each in its own pages.
    const KvLayer* first = (*cache)[0].kv;
    std::vector<PagedRows> segments;
    int covered = 0;
    for (const KvSegment& sg : *cache) {
      const KvLayer* kv = sg.kv;
      EE_CHECK(sg.row == covered && sg.rows > 0, "KV segments must cover the rows in order");
      covered += sg.rows;
      EE_CHECK(sg.q_offset + sg.rows <= kv->pages->tokens(),
               "KV cache overflow: ", sg.q_offset + sg.rows, " > ", kv->pages->tokens());
      EE_CHECK(kv->k.data == first->k.data && kv->v.data == first->v.data,
               "KV segments of one pass in different pools");
      segments.push_back({kv->pages, sg.row, sg.rows, sg.q_offset});
    }
    EE_CHECK(covered == n, "KV segments cover ", covered, " of ", n, " rows");
    EE_CHECK(first->k.dtype == at.k.dtype, "KV cache dtype ", DTypeName(first->k.dtype),
             " != ", DTypeName(at.k.dtype));
    be->PagedAttentionPass(at.att, at.q, at.k, at.v, first->k, first->v, segments, hq, hkv, d,
                           at.q_stride, at.kv_stride);
  }
  RowParallelResidual(ctx, a.h_attn, x, at.att, p.attn.wo, p.attn.bo, n, hq * d, rows, 0);
  MlpForward(ctx, p.mlp, a.mlp, a.out, a.h_attn, n);
}

void BlockBackward(const LayerContext& ctx, const BlockParams& p, const BlockActs& a, float* dx,
                   const float* dout, const float* d_h_attn_extra, const float* x,
                   const int32_t* pos, int b, int t, const GradScratch& s) {
  const ModelConfig& c = *ctx.cfg;
  const int h = c.hidden_size, d = c.head_dim(), hq = c.num_heads, hkv = c.num_kv_heads;
  const int n = b * t, rows = ctx.LocalRows(n);
  const size_t nh = static_cast<size_t>(rows) * h;
  Backend* be = ctx.be;
  // Gradient at h_attn: residual (+ exit reading h_attn) + MLP branch, the residual part passed
  // through the norm's backward (no copy).
  const float* dres = dout;
  if (d_h_attn_extra) {
    be->Add(s.dh, dout, d_h_attn_extra, nh);
    dres = s.dh;
  }
  MlpBranchBackward(ctx, p.mlp, a.mlp, s.dh, dres, dout, a.h_attn, n, s);
  // Gradient at x: residual + attention branch (dx written by the norm's backward at the end).
  const AttnActs& at = a.attn;
  be->LinearBackward(s.datt, ctx.G(p.attn.wo), ctx.G(p.attn.bo),
                     BranchOutputGrad(ctx, s.dh, rows, 0, s), at.att, ctx.P(p.attn.wo), n, hq * d,
                     h, false);
  // dq, dk, dv in the layout the forward chose for q, k, v.
  const Qkv g = QkvLayout(c, s.dqkv, n, at.fused);
  be->AttentionBackward(g.q, g.k, g.v, s.datt, at.att, at.lse, at.q, at.k, at.v, b, t, hq, hkv, d,
                        at.q_stride, at.kv_stride);
  if (c.use_rope()) {  // with bf16 operands dq, dk round again after the rotation
    if (at.fused) {    // the heads of dq and dk, side by side in each row
      be->RopeBackward(g.q, pos, n, hq + hkv, d, g.q_stride, c.rope());
    } else {
      be->RopeBackward(g.q, pos, n, hq, d, g.q_stride, c.rope());
      be->RopeBackward(g.k, pos, n, hkv, d, g.kv_stride, c.rope());
    }
  }
  ConstOperand dq = g.q, dk = g.k;  // at the projections' outputs
  if (c.qk_norm) {
    HeadNormBackward(ctx, p.attn.q_norm, at.q_raw, at.q_rstd, g.q, s.dq_f32, s.dq_raw, n * hq);
    HeadNormBackward(ctx, p.attn.k_norm, at.k_raw, at.k_rstd, g.k, s.dk_f32, s.dk_raw, n * hkv);
    dq = s.dq_raw;
    dk = s.dk_raw;
  }
  const ConstOperand in = BranchInput(ctx, at.norm.out, rows);  // gathered again
  if (at.fused) {  // dnorm written once, from all (hq + 2 hkv) d columns
    be->LinearBackward(s.dnorm, ctx.G(p.attn.wq), ctx.G(p.attn.bq), g.q, in, ctx.P(p.attn.wq), n, h,
                       g.q_stride, false);
  } else {
    be->LinearBackward(s.dnorm, ctx.G(p.attn.wq), ctx.G(p.attn.bq), dq, in, ctx.P(p.attn.wq), n, h,
                       hq * d, false);
    be->LinearBackward(s.dnorm, ctx.G(p.attn.wk), ctx.G(p.attn.bk), dk, in, ctx.P(p.attn.wk), n, h,
                       hkv * d, true);
    be->LinearBackward(s.dnorm, ctx.G(p.attn.wv), ctx.G(p.attn.bv), g.v, in, ctx.P(p.attn.wv), n, h,
                       hkv * d, true);
  }
  // Heads are split over tp: each rank's dnorm covers its own.
  BranchInputBackward(ctx, p.attn.norm, at.norm, dx, s.dh, s.dnorm, x, n, rows);
}

}  // namespace eellm
