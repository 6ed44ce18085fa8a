#include "engine/profiling_backend.h"

#include <algorithm>

namespace eellm {

ProfilingBackend::Timed::Timed(ProfilingBackend* b, const char* op) : b_(b), op_(op) {
  if (!b_->timing_) return;
  b_->inner_->Synchronize();
  start_ = std::chrono::steady_clock::now();
}

ProfilingBackend::Timed::~Timed() {
  if (!b_->timing_) return;
  b_->inner_->Synchronize();
  OpStats& s = b_->stats_[op_];
  s.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  ++s.calls;
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
  inner_->CopyToHost(host_dst, src, bytes);
}

void ProfilingBackend::CopyFromHost(void* dst, const void* host_src, size_t bytes) {
  inner_->CopyFromHost(dst, host_src, bytes);
}

void ProfilingBackend::Copy(void* dst, const void* src, size_t bytes) {
  Timed timed(this, "Copy");
  inner_->Copy(dst, src, bytes);
}

void ProfilingBackend::Synchronize() { inner_->Synchronize(); }

void ProfilingBackend::Fill(float* x, size_t n, float value) {
  Timed timed(this, "Fill");
  inner_->Fill(x, n, value);
}

void ProfilingBackend::Add(float* y, const float* a, const float* b, size_t n) {
  Timed timed(this, "Add");
  inner_->Add(y, a, b, n);
}

void ProfilingBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  Timed timed(this, "Axpy");
  inner_->Axpy(y, alpha, x, n);
}

void ProfilingBackend::Scale(float* x, float alpha, size_t n) {
  Timed timed(this, "Scale");
  inner_->Scale(x, alpha, n);
}

double ProfilingBackend::SumSquares(const float* x, size_t n) {
  Timed timed(this, "SumSquares");
  return inner_->SumSquares(x, n);
}

void ProfilingBackend::EmbeddingForward(float* out, const int32_t* ids, const float* table, int n,
                                        int c) {
  Timed timed(this, "EmbeddingForward");
  inner_->EmbeddingForward(out, ids, table, n, c);
}

void ProfilingBackend::EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout,
                                         int n, int c) {
  Timed timed(this, "EmbeddingBackward");
  inner_->EmbeddingBackward(dtable, ids, dout, n, c);
}

void ProfilingBackend::Linear(Operand out, ConstOperand in, const float* w, const float* bias,
                              int n, int in_dim, int out_dim, bool accumulate) {
  Timed timed(this, "Linear");
  inner_->Linear(out, in, w, bias, n, in_dim, out_dim, accumulate);
}

void ProfilingBackend::LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout,
                                      ConstOperand in, const float* w, int n, int in_dim,
                                      int out_dim, bool accumulate_din) {
  Timed timed(this, "LinearBackward");
  inner_->LinearBackward(din, dw, dbias, dout, in, w, n, in_dim, out_dim, accumulate_din);
}

void ProfilingBackend::LayerNormForward(Operand out, float* mean, float* rstd, const float* x,
                                        const float* g, const float* b, int n, int c, float eps) {
  Timed timed(this, "LayerNormForward");
  inner_->LayerNormForward(out, mean, rstd, x, g, b, n, c, eps);
}

void ProfilingBackend::LayerNormBackward(float* dx, float* dg, float* db, const float* dout,
                                         const float* x, const float* g, const float* mean,
                                         const float* rstd, int n, int c) {
  Timed timed(this, "LayerNormBackward");
  inner_->LayerNormBackward(dx, dg, db, dout, x, g, mean, rstd, n, c);
}

void ProfilingBackend::RmsNormForward(Operand out, float* rstd, const float* x, const float* g,
                                      int n, int c, float eps) {
  Timed timed(this, "RmsNormForward");
  inner_->RmsNormForward(out, rstd, x, g, n, c, eps);
}

void ProfilingBackend::RmsNormBackward(float* dx, float* dg, const float* dout, const float* x,
                                       const float* g, const float* rstd, int n, int c) {
  Timed timed(this, "RmsNormBackward");
  inner_->RmsNormBackward(dx, dg, dout, x, g, rstd, n, c);
}

void ProfilingBackend::GeluForward(Operand out, ConstOperand x, size_t n) {
  Timed timed(this, "GeluForward");
  inner_->GeluForward(out, x, n);
}

void ProfilingBackend::GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) {
  Timed timed(this, "GeluBackward");
  inner_->GeluBackward(dx, dout, x, n);
}

void ProfilingBackend::SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, size_t n) {
  Timed timed(this, "SwiGluForward");
  inner_->SwiGluForward(out, gate, up, n);
}

void ProfilingBackend::SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout,
                                      ConstOperand gate, ConstOperand up, size_t n) {
  Timed timed(this, "SwiGluBackward");
  inner_->SwiGluBackward(dgate, dup, dout, gate, up, n);
}

void ProfilingBackend::RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim,
                                   float theta) {
  Timed timed(this, "RopeForward");
  inner_->RopeForward(x, pos, n, heads, head_dim, theta);
}

void ProfilingBackend::RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim,
                                    float theta) {
  Timed timed(this, "RopeBackward");
  inner_->RopeBackward(dx, pos, n, heads, head_dim, theta);
}

void ProfilingBackend::AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k,
                                        ConstOperand v, int b, int tq, int tk, int tk_cap, int hq,
                                        int hkv, int d, int q_offset) {
  Timed timed(this, "AttentionForward");
  inner_->AttentionForward(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, d, q_offset);
}

void ProfilingBackend::AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout,
                                         ConstOperand out, const float* lse, ConstOperand q,
                                         ConstOperand k, ConstOperand v, int b, int t, int hq,
                                         int hkv, int d) {
  Timed timed(this, "AttentionBackward");
  inner_->AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v, b, t, hq, hkv, d);
}

void ProfilingBackend::CrossEntropy(float* losses, float* max_prob, Operand dlogits,
                                    const float* logits, const int32_t* targets,
                                    const float* weights, int n, int v) {
  Timed timed(this, "CrossEntropy");
  inner_->CrossEntropy(losses, max_prob, dlogits, logits, targets, weights, n, v);
}

void ProfilingBackend::EmbeddingForwardRange(float* out, const int32_t* ids, const float* table,
                                             int n, int c, int start, int rows) {
  Timed timed(this, "EmbeddingForwardRange");
  inner_->EmbeddingForwardRange(out, ids, table, n, c, start, rows);
}

void ProfilingBackend::EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout,
                                              int n, int c, int start, int rows) {
  Timed timed(this, "EmbeddingBackwardRange");
  inner_->EmbeddingBackwardRange(dtable, ids, dout, n, c, start, rows);
}

void ProfilingBackend::RowMax(float* row_max, const float* logits, int n, int v) {
  Timed timed(this, "RowMax");
  inner_->RowMax(row_max, logits, n, v);
}

void ProfilingBackend::SumExpAndTarget(float* sum_exp, float* target_logit, const float* logits,
                                       const float* row_max, const int32_t* targets, int n, int v,
                                       int start) {
  Timed timed(this, "SumExpAndTarget");
  inner_->SumExpAndTarget(sum_exp, target_logit, logits, row_max, targets, n, v, start);
}

void ProfilingBackend::CrossEntropyGradRange(Operand dlogits, const float* logits,
                                             const float* row_max, const float* sum_exp,
                                             const int32_t* targets, const float* weights, int n,
                                             int v, int start) {
  Timed timed(this, "CrossEntropyGradRange");
  inner_->CrossEntropyGradRange(dlogits, logits, row_max, sum_exp, targets, weights, n, v, start);
}

void ProfilingBackend::AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, int step) {
  Timed timed(this, "AdamW");
  inner_->AdamW(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, step);
}
}  // namespace eellm
