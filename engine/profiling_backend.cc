#include "engine/profiling_backend.h"

#include <algorithm>
#include <utility>

namespace eellm {
namespace {

// Bytes of `n` elements of an operand, of an fp32 tensor.
double B(ConstOperand x, double n) { return n * DTypeSize(x.dtype); }
double F32(double n) { return 4 * n; }

// Query-key pairs a causal attention computes: query i (at position q_offset + i) sees keys
// 0 .. q_offset + i (the contract keeps q_offset + tq <= tk).
double CausalPairs(int tq, int q_offset) {
  return static_cast<double>(tq) * q_offset + 0.5 * tq * (tq + 1.0);
}

}  // namespace

ProfilingBackend::Timed::Timed(ProfilingBackend* b, const char* op, double flops, double bytes,
                               std::string shape)
    : b_(b), op_(op), flops_(flops), bytes_(bytes), shape_(std::move(shape)) {
  if (!b_->timing_) return;
  b_->inner_->Synchronize();
  start_ = std::chrono::steady_clock::now();
}

ProfilingBackend::Timed::~Timed() {
  if (!b_->timing_) return;
  b_->inner_->Synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  for (OpStats* s : {&b_->stats_[op_], shape_.empty() ? nullptr : &b_->gemm_shapes_[shape_]}) {
    if (s == nullptr) continue;
    s->seconds += seconds;
    ++s->calls;
    s->flops += flops_;
    s->bytes += bytes_;
  }
}

Device ProfilingBackend::device() const { return inner_->device(); }

std::string ProfilingBackend::name() const { return "profiled-" + inner_->name(); }

void* ProfilingBackend::Alloc(size_t bytes) {
  void* p = inner_->Alloc(bytes);
  ++alloc_calls_;
  live_[p] = bytes;
  allocated_ += bytes;
  peak_ = std::max(peak_, allocated_);
  return p;
}

void ProfilingBackend::Free(void* p) {
  auto it = live_.find(p);
  if (it != live_.end()) {
    allocated_ -= it->second;
    live_.erase(it);
  }
  inner_->Free(p);
}

void ProfilingBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  ++host_waits_;
  Timed timed(this, "CopyToHost", 0, bytes);
  inner_->CopyToHost(host_dst, src, bytes);
}

void ProfilingBackend::CopyFromHost(void* dst, const void* host_src, size_t bytes) {
  Timed timed(this, "CopyFromHost", 0, bytes);
  inner_->CopyFromHost(dst, host_src, bytes);
}

void ProfilingBackend::Copy(void* dst, const void* src, size_t bytes) {
  Timed timed(this, "Copy", 0, 2.0 * bytes);
  inner_->Copy(dst, src, bytes);
}

void ProfilingBackend::CopyRows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                size_t row_bytes, int rows) {
  Timed timed(this, "Copy", 0, 2.0 * row_bytes * std::max(rows, 0));
  inner_->CopyRows(dst, dst_pitch, src, src_pitch, row_bytes, rows);
}

void ProfilingBackend::Synchronize() {
  ++host_waits_;
  inner_->Synchronize();
}

void ProfilingBackend::Fill(float* x, size_t n, float value) {
  Timed timed(this, "Fill", 0, F32(n));
  inner_->Fill(x, n, value);
}

void ProfilingBackend::Add(float* y, const float* a, const float* b, size_t n) {
  Timed timed(this, "Add", 0, F32(3.0 * n));
  inner_->Add(y, a, b, n);
}

void ProfilingBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  Timed timed(this, "Axpy", 0, F32(3.0 * n));
  inner_->Axpy(y, alpha, x, n);
}

void ProfilingBackend::Scale(Operand x, float alpha, size_t n) {
  Timed timed(this, "Scale", 0, B(x, 2.0 * n));
  inner_->Scale(x, alpha, n);
}

void ProfilingBackend::ToFloat(float* out, ConstOperand in, size_t n) {
  Timed timed(this, "ToFloat", 0, B(in, n) + F32(n));
  inner_->ToFloat(out, in, n);
}

double ProfilingBackend::SumSquares(const float* x, size_t n) {
  ++host_waits_;
  Timed timed(this, "SumSquares", 0, F32(n));
  return inner_->SumSquares(x, n);
}

double ProfilingBackend::SumSquaresRanges(const float* x, const std::vector<Range>& ranges) {
  ++host_waits_;
  size_t n = 0;
  for (const Range& r : ranges) n += r.count;
  Timed timed(this, "SumSquares", 0, F32(n));
  return inner_->SumSquaresRanges(x, ranges);
}

void ProfilingBackend::EmbeddingForward(float* out, const int32_t* ids, const float* table, int n,
                                        int c) {
  Timed timed(this, "EmbeddingForward", 0, F32(2.0 * n * c + n));
  inner_->EmbeddingForward(out, ids, table, n, c);
}

void ProfilingBackend::EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n,
                                    int c) {
  Timed timed(this, "EmbeddingAdd", 0, F32(3.0 * n * c + n));
  inner_->EmbeddingAdd(out, ids, table, n, c);
}

void ProfilingBackend::EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout,
                                         int n, int c) {
  Timed timed(this, "EmbeddingBackward", 0, F32(3.0 * n * c + n));
  inner_->EmbeddingBackward(dtable, ids, dout, n, c);
}

double ProfilingBackend::LinearBytes(ConstOperand in, bool bias, int n, int in_dim, int out_dim,
                                     double out_bytes) const {
  // Weights are read in the operand dtype (a backend with bf16 operands keeps bf16 copies).
  const double ws = DTypeSize(inner_->operand_dtype());
  return B(in, 1.0 * n * in_dim) + ws * out_dim * in_dim + out_bytes + (bias ? F32(out_dim) : 0.0);
}

void ProfilingBackend::Linear(Operand out, ConstOperand in, const float* w, const float* bias,
                              int n, int in_dim, int out_dim, bool accumulate) {
  Timed timed(this, "Linear", 2.0 * n * in_dim * out_dim,
              LinearBytes(in, bias != nullptr, n, in_dim, out_dim,
                          B(out, 1.0 * n * out_dim) * (accumulate ? 2 : 1)),
              GemmShape("Linear", n, in_dim, out_dim, [&] {
                return std::string(DTypeName(out.dtype)) + " out" + (bias ? ", bias" : "") +
                       (accumulate ? ", added to out" : "");
              }));
  inner_->Linear(out, in, w, bias, n, in_dim, out_dim, accumulate);
}

void ProfilingBackend::LinearResidual(float* out, const float* residual, ConstOperand in,
                                      const float* w, const float* bias, int n, int in_dim,
                                      int out_dim) {
  // Counted with Linear: the same GEMM, reading the residual where Linear reads out to add to.
  Timed timed(this, "Linear", 2.0 * n * in_dim * out_dim,
              LinearBytes(in, bias != nullptr, n, in_dim, out_dim, F32(2.0 * n * out_dim)),
              GemmShape("LinearResidual", n, in_dim, out_dim, [&] {
                return std::string("f32 residual in, f32 out") + (bias ? ", bias" : "");
              }));
  inner_->LinearResidual(out, residual, in, w, bias, n, in_dim, out_dim);
}

void ProfilingBackend::LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout,
                                      ConstOperand in, const float* w, int n, int in_dim,
                                      int out_dim, bool accumulate_din) {
  const double ws = DTypeSize(inner_->operand_dtype());
  const bool gin = din.data != nullptr, gw = dw != nullptr;
  const double ni = 1.0 * n * in_dim, wi = 1.0 * out_dim * in_dim;
  Timed timed(
      this, "LinearBackward", 2.0 * ni * out_dim * ((gin ? 1 : 0) + (gw ? 1 : 0)),
      B(dout, 1.0 * n * out_dim) + (gin ? ws * wi + B(din, ni) * (accumulate_din ? 2 : 1) : 0.0) +
          (gw ? B(in, ni) + F32(2.0 * wi) : 0.0) + (dbias != nullptr ? F32(2.0 * out_dim) : 0.0),
      GemmShape("LinearBackward", n, in_dim, out_dim, [&] {
        return (gin ? std::string(DTypeName(din.dtype)) + (accumulate_din ? " dX added" : " dX")
                    : std::string()) +
               (gin && gw ? " and " : "") + (gw ? "dW" : "") + (dbias ? ", dbias" : "");
      }));
  inner_->LinearBackward(din, dw, dbias, dout, in, w, n, in_dim, out_dim, accumulate_din);
}

void ProfilingBackend::LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w,
                                  const float* bias, int n, int in_dim, int out_dim) {
  // The GEMM (grouped with the GEMMs) with the GELU: pre and act written.
  const double no = 1.0 * n * out_dim;
  Timed timed(this, "LinearGelu", 2.0 * no * in_dim,
              LinearBytes(in, bias != nullptr, n, in_dim, out_dim, B(pre, no) + B(act, no)),
              GemmShape("LinearGelu", n, in_dim, out_dim,
                        [&] { return std::string(DTypeName(act.dtype)) + " pre and act"; }));
  inner_->LinearGelu(act, pre, in, w, bias, n, in_dim, out_dim);
}

void ProfilingBackend::LinearBackwardGelu(Operand dpre, float* dw, float* dbias, ConstOperand dout,
                                          ConstOperand act, ConstOperand pre, const float* w, int n,
                                          int in_dim, int out_dim) {
  // Both GEMMs; pre read for gelu', dpre written, act read by the weight gradient.
  const double ws = DTypeSize(inner_->operand_dtype());
  const double ni = 1.0 * n * in_dim, wi = 1.0 * out_dim * in_dim;
  Timed timed(this, "LinearBackwardGelu", 4.0 * ni * out_dim,
              B(dout, 1.0 * n * out_dim) + ws * wi + B(pre, ni) + B(dpre, ni) + B(act, ni) +
                  F32(2.0 * wi) + (dbias != nullptr ? F32(2.0 * out_dim) : 0.0),
              GemmShape("LinearBackwardGelu", n, in_dim, out_dim, [&] {
                return std::string(DTypeName(dpre.dtype)) + " dpre and dW" +
                       (dbias ? ", dbias" : "");
              }));
  inner_->LinearBackwardGelu(dpre, dw, dbias, dout, act, pre, w, n, in_dim, out_dim);
}

void ProfilingBackend::LayerNormForward(Operand out, float* mean, float* rstd, const float* x,
                                        const float* g, const float* b, int n, int c, float eps) {
  Timed timed(this, "LayerNormForward", 0,
              F32(1.0 * n * c + 2.0 * c + 2.0 * n) + B(out, 1.0 * n * c));
  inner_->LayerNormForward(out, mean, rstd, x, g, b, n, c, eps);
}

void ProfilingBackend::LayerNormBackward(float* dx, const float* dres, float* dg, float* db,
                                         const float* dout, const float* x, const float* g,
                                         const float* mean, const float* rstd, int n, int c) {
  // dout, x, dres (if any) read and dx written; g read; dg and db read and written; mean, rstd.
  const double nc = 1.0 * n * c;
  Timed timed(this, "LayerNormBackward", 0,
              F32((dres != nullptr ? 4 : 3) * nc + 5.0 * c + 2.0 * n));
  inner_->LayerNormBackward(dx, dres, dg, db, dout, x, g, mean, rstd, n, c);
}

void ProfilingBackend::RmsNormForward(Operand out, float* rstd, const float* x, const float* g,
                                      int n, int c, float eps) {
  Timed timed(this, "RmsNormForward", 0, F32(1.0 * n * c + c + n) + B(out, 1.0 * n * c));
  inner_->RmsNormForward(out, rstd, x, g, n, c, eps);
}

void ProfilingBackend::RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                                       const float* x, const float* g, const float* rstd, int n,
                                       int c) {
  const double nc = 1.0 * n * c;
  Timed timed(this, "RmsNormBackward", 0, F32((dres != nullptr ? 4 : 3) * nc + 3.0 * c + n));
  inner_->RmsNormBackward(dx, dres, dg, dout, x, g, rstd, n, c);
}

void ProfilingBackend::GeluForward(Operand out, ConstOperand x, size_t n) {
  Timed timed(this, "GeluForward", 0, B(x, n) + B(out, n));
  inner_->GeluForward(out, x, n);
}

void ProfilingBackend::GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) {
  Timed timed(this, "GeluBackward", 0, B(dout, n) + B(x, n) + B(dx, n));
  inner_->GeluBackward(dx, dout, x, n);
}

void ProfilingBackend::SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows,
                                     int cols, int stride) {
  const size_t n = static_cast<size_t>(rows) * cols;
  Timed timed(this, "SwiGluForward", 0, B(gate, n) + B(up, n) + B(out, n));
  inner_->SwiGluForward(out, gate, up, rows, cols, stride);
}

void ProfilingBackend::SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout,
                                      ConstOperand gate, ConstOperand up, int rows, int cols,
                                      int stride) {
  const size_t n = static_cast<size_t>(rows) * cols;
  Timed timed(this, "SwiGluBackward", 0,
              B(dout, n) + B(gate, n) + B(up, n) + B(dgate, n) + B(dup, n));
  inner_->SwiGluBackward(dgate, dup, dout, gate, up, rows, cols, stride);
}

void ProfilingBackend::DropoutAdd(float* out, const float* x, const float* branch, int n, int c,
                                  float p, uint64_t key, int64_t row0) {
  Timed timed(this, "DropoutAdd", 0, F32((x ? 3.0 : 2.0) * n * c));
  inner_->DropoutAdd(out, x, branch, n, c, p, key, row0);
}

void ProfilingBackend::DropoutBackward(float* dbranch, const float* dout, int n, int c, float p,
                                       uint64_t key, int64_t row0) {
  Timed timed(this, "DropoutBackward", 0, F32(2.0 * n * c));
  inner_->DropoutBackward(dbranch, dout, n, c, p, key, row0);
}

void ProfilingBackend::RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim,
                                   int stride, const RopeParams& rope) {
  Timed timed(this, "RopeForward", 0, B(x, 2.0 * n * heads * head_dim));
  inner_->RopeForward(x, pos, n, heads, head_dim, stride, rope);
}

void ProfilingBackend::RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim,
                                    int stride, const RopeParams& rope) {
  Timed timed(this, "RopeBackward", 0, B(dx, 2.0 * n * heads * head_dim));
  inner_->RopeBackward(dx, pos, n, heads, head_dim, stride, rope);
}

void ProfilingBackend::AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k,
                                        ConstOperand v, int b, int tq, int tk, int tk_cap, int hq,
                                        int hkv, int d, int q_offset, int q_stride, int kv_stride) {
  // 4 d FLOPs per (query, visible key) pair and head (S = Q K^T and P V).
  const double flops = 4.0 * d * b * hq * CausalPairs(tq, q_offset);
  const double nq = 1.0 * b * tq * hq * d, nkv = 1.0 * b * tk * hkv * d;
  Timed timed(this, "AttentionForward", flops,
              B(q, nq) + B(k, nkv) + B(v, nkv) + B(out, nq) +
                  (lse != nullptr ? F32(1.0 * b * hq * tq) : 0.0));
  inner_->AttentionForward(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, d, q_offset, q_stride,
                           kv_stride);
}

void ProfilingBackend::PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k,
                                             ConstOperand v, const KvPageTable& pages, int tq,
                                             int hq, int hkv, int d, int q_offset, int q_stride) {
  const double flops = 4.0 * d * hq * CausalPairs(tq, q_offset);
  const double nq = 1.0 * tq * hq * d, nkv = 1.0 * (q_offset + tq) * hkv * d;
  Timed timed(this, "AttentionForward", flops, B(q, nq) + B(k, nkv) + B(v, nkv) + B(out, nq));
  inner_->PagedAttentionForward(out, q, k, v, pages, tq, hq, hkv, d, q_offset, q_stride);
}

void ProfilingBackend::PagedAttentionPass(Operand out, ConstOperand q, ConstOperand k,
                                          ConstOperand v, Operand k_pool, Operand v_pool,
                                          const std::vector<PagedRows>& segments, int hq, int hkv,
                                          int d, int q_stride, int kv_stride) {
  // As PagedAttentionForward per segment, and the new keys and values read and written once.
  double flops = 0.0, bytes = 0.0;
  for (const PagedRows& sg : segments) {
    const double nq = 1.0 * sg.rows * hq * d, nkv = 1.0 * (sg.q_offset + sg.rows) * hkv * d;
    const double n_new = 1.0 * sg.rows * hkv * d;
    flops += 4.0 * d * hq * CausalPairs(sg.rows, sg.q_offset);
    bytes +=
        B(q, nq) + B(out, nq) + B(k_pool, nkv) + B(v_pool, nkv) + 2 * (B(k, n_new) + B(v, n_new));
  }
  Timed timed(this, "AttentionForward", flops, bytes);
  inner_->PagedAttentionPass(out, q, k, v, k_pool, v_pool, segments, hq, hkv, d, q_stride,
                             kv_stride);
}

void ProfilingBackend::AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout,
                                         ConstOperand out, const float* lse, ConstOperand q,
                                         ConstOperand k, ConstOperand v, int b, int t, int hq,
                                         int hkv, int d, int q_stride, int kv_stride) {
  // 2.5 times the forward's FLOPs (the FlashAttention convention: dV, dP, dQ, dK and the
  // recomputed S).
  const double flops = 2.5 * 4.0 * d * b * hq * CausalPairs(t, 0);
  const double nq = 1.0 * b * t * hq * d, nkv = 1.0 * b * t * hkv * d;
  Timed timed(this, "AttentionBackward", flops,
              B(q, nq) + B(k, nkv) + B(v, nkv) + B(out, nq) + B(dout, nq) + B(dq, nq) + B(dk, nkv) +
                  B(dv, nkv) + F32(1.0 * b * hq * t));
  inner_->AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v, b, t, hq, hkv, d, q_stride,
                            kv_stride);
}

void ProfilingBackend::CrossEntropy(float* losses, float* max_prob, Operand dlogits,
                                    ConstOperand logits, const int32_t* targets,
                                    const float* weights, bool by_confidence, int n, int v) {
  Timed timed(this, "CrossEntropy", 0,
              B(logits, 1.0 * n * v) + (dlogits.data != nullptr ? B(dlogits, 1.0 * n * v) : 0.0));
  inner_->CrossEntropy(losses, max_prob, dlogits, logits, targets, weights, by_confidence, n, v);
}

void ProfilingBackend::EmbeddingForwardRange(float* out, const int32_t* ids, const float* table,
                                             int n, int c, int start, int rows) {
  Timed timed(this, "EmbeddingForwardRange", 0, F32(2.0 * n * c + n));
  inner_->EmbeddingForwardRange(out, ids, table, n, c, start, rows);
}

void ProfilingBackend::EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout,
                                              int n, int c, int start, int rows) {
  Timed timed(this, "EmbeddingBackwardRange", 0, F32(3.0 * n * c + n));
  inner_->EmbeddingBackwardRange(dtable, ids, dout, n, c, start, rows);
}

void ProfilingBackend::RowMax(float* row_max, ConstOperand logits, int n, int v) {
  Timed timed(this, "RowMax", 0, B(logits, 1.0 * n * v));
  inner_->RowMax(row_max, logits, n, v);
}

void ProfilingBackend::SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                                       const float* row_max, const int32_t* targets, int n, int v,
                                       int start) {
  Timed timed(this, "SumExpAndTarget", 0, B(logits, 1.0 * n * v));
  inner_->SumExpAndTarget(sum_exp, target_logit, logits, row_max, targets, n, v, start);
}

void ProfilingBackend::CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                             const float* sum_exp, const float* target_logit,
                                             int n) {
  // Reads three floats a row, writes one or two.
  Timed timed(this, "CrossEntropyFromStats", 0, 4.0 * n * (max_prob != nullptr ? 5 : 4));
  inner_->CrossEntropyFromStats(losses, max_prob, row_max, sum_exp, target_logit, n);
}

void ProfilingBackend::CrossEntropyGradRange(Operand dlogits, ConstOperand logits,
                                             const float* row_max, const float* sum_exp,
                                             const int32_t* targets, const float* weights,
                                             bool by_confidence, int n, int v, int start) {
  Timed timed(this, "CrossEntropyGradRange", 0, B(logits, 1.0 * n * v) + B(dlogits, 1.0 * n * v));
  inner_->CrossEntropyGradRange(dlogits, logits, row_max, sum_exp, targets, weights, by_confidence,
                                n, v, start);
}

void ProfilingBackend::AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, int step) {
  Timed timed(this, "AdamW", 0, F32(7.0 * n));
  inner_->AdamW(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, step);
}

void ProfilingBackend::AdamWRuns(float* p, const float* g, float* m, float* v,
                                 const std::vector<AdamWRun>& runs, float lr, float beta1,
                                 float beta2, float eps, float weight_decay, int step) {
  double n = 0;
  for (const AdamWRun& r : runs) n += static_cast<double>(r.count);
  Timed timed(this, "AdamW", 0, F32(7.0 * n));
  inner_->AdamWRuns(p, g, m, v, runs, lr, beta1, beta2, eps, weight_decay, step);
}
}  // namespace eellm
