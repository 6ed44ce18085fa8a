// Bf16ReferenceBackend: the CPU backend's arithmetic with the mixed-precision storage of
// cuda-bf16w, as the oracle of whole-step parity for that backend. Its operand_dtype() is bf16,
// so a model built on it keeps the same tensors in bf16 as on cuda-bf16w; each op converts its
// bf16 operands to fp32 exactly, runs the CPU op, and rounds each bf16 output once, where the
// device rounds it. GEMM inputs are rounded to bf16 (a weight, an fp32 gradient) as the
// device's tensor-core GEMMs read them; a bias is added before the output's rounding (in the
// output's dtype, as cuBLASLt's epilogue does) and its gradient sums dout as the GEMMs read it.
// Inside attention, the probabilities and dS are rounded as the device's fused kernels, its
// per-head path or cuDNN's graphs round them (see AttentionForward). What is left: summation
// orders, and the rare bf16 rounding that their fp32 noise tips the other way, instead of the
// compounded rounding of every operand that separates the device from the fp32 CPU run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"

namespace eellm::testing {

class Bf16ReferenceBackend final : public Backend {
 public:
  // Wraps a CPU backend (host memory: operands are read and written directly). Attention rounds
  // as the device's fused kernels do for head dimensions where fused_attention(head_dim) is true,
  // as its per-head GEMM path does otherwise; for head dimensions where cudnn_graphs(head_dim) is
  // true, the training path's attention (the forward with lse over a whole causal square of t >= 2
  // tokens, and its backward: what CudaBackend offers cuDNN) rounds as cuDNN's graphs do
  // (cudnn_graph_reference.h). (The device also needs
  // 16-byte aligned tensors for either; the models' layouts always give them.)
  Bf16ReferenceBackend(std::unique_ptr<Backend> cpu, std::function<bool(int)> fused_attention,
                       std::function<bool(int)> cudnn_graphs = nullptr);

  Device device() const override { return cpu_->device(); }
  std::string name() const override { return "cpu-bf16w-reference"; }
  DType operand_dtype() const override { return DType::kBF16; }
  void* Alloc(size_t bytes) override { return cpu_->Alloc(bytes); }
  void Free(void* p) override { cpu_->Free(p); }
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override {
    cpu_->CopyToHost(host_dst, src, bytes);
  }
  void CopyFromHost(void* dst, const void* host_src, size_t bytes) override {
    cpu_->CopyFromHost(dst, host_src, bytes);
  }
  void Copy(void* dst, const void* src, size_t bytes) override { cpu_->Copy(dst, src, bytes); }
  void Synchronize() override { cpu_->Synchronize(); }
  void Fill(float* x, size_t n, float value) override { cpu_->Fill(x, n, value); }
  void Add(float* y, const float* a, const float* b, size_t n) override { cpu_->Add(y, a, b, n); }
  void Axpy(float* y, float alpha, const float* x, size_t n) override {
    cpu_->Axpy(y, alpha, x, n);
  }
  void Scale(Operand x, float alpha, size_t n) override;
  void ToFloat(float* out, ConstOperand in, size_t n) override;
  double SumSquares(const float* x, size_t n) override { return cpu_->SumSquares(x, n); }
  void EmbeddingForward(float* out, const int32_t* ids, const float* table, int n, int c) override {
    cpu_->EmbeddingForward(out, ids, table, n, c);
  }
  void EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                         int c) override {
    cpu_->EmbeddingBackward(dtable, ids, dout, n, c);
  }
  void EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) override {
    cpu_->EmbeddingAdd(out, ids, table, n, c);
  }
  void LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                         const float* x, const float* g, const float* mean, const float* rstd,
                         int n, int c) override {
    cpu_->LayerNormBackward(dx, dres, dg, db, dout, x, g, mean, rstd, n, c);
  }
  void RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout, const float* x,
                       const float* g, const float* rstd, int n, int c) override {
    cpu_->RmsNormBackward(dx, dres, dg, dout, x, g, rstd, n, c);
  }
  void EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n, int c,
                             int start, int rows) override {
    cpu_->EmbeddingForwardRange(out, ids, table, n, c, start, rows);
  }
  void EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n, int c,
                              int start, int rows) override {
    cpu_->EmbeddingBackwardRange(dtable, ids, dout, n, c, start, rows);
  }
  void RowMax(float* row_max, ConstOperand logits, int n, int v) override;
  void SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                       const float* row_max, const int32_t* targets, int n, int v,
                       int start) override;
  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int step) override {
    cpu_->AdamW(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, step);
  }

  // The ops with operands: converted, run on the CPU, rounded back.
  void Linear(Operand out, ConstOperand in, const float* w, const float* bias, int n, int in_dim,
              int out_dim, bool accumulate) override;
  void LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout, ConstOperand in,
                      const float* w, int n, int in_dim, int out_dim, bool accumulate_din) override;
  // The GELU on the fp32 product (the device's epilogue, or its kernel from an fp32 product):
  // pre and act rounded once each. (LinearBackwardGelu is Backend's: dout @ w rounded to dpre's
  // dtype, then gelu', as the device's DGELU epilogue does.)
  void LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w, const float* bias,
                  int n, int in_dim, int out_dim) override;
  void LayerNormForward(Operand out, float* mean, float* rstd, const float* x, const float* g,
                        const float* b, int n, int c, float eps) override;
  void RmsNormForward(Operand out, float* rstd, const float* x, const float* g, int n, int c,
                      float eps) override;
  void GeluForward(Operand out, ConstOperand x, size_t n) override;
  void GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) override;
  void SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows, int cols,
                     int stride) override;
  void SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout, ConstOperand gate,
                      ConstOperand up, int rows, int cols, int stride) override;
  void DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                  uint64_t key, int64_t row0) override {
    cpu_->DropoutAdd(out, x, branch, n, c, p, key, row0);
  }
  void DropoutBackward(float* dbranch, const float* dout, int n, int c, float p, uint64_t key,
                       int64_t row0) override {
    cpu_->DropoutBackward(dbranch, dout, n, c, p, key, row0);
  }
  void RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim, int stride,
                   const RopeParams& rope) override;
  void RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim, int stride,
                    const RopeParams& rope) override;
  void AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k, ConstOperand v,
                        int b, int tq, int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                        int q_stride, int kv_stride) override;
  // The keys gathered in position order, then AttentionForward.
  void PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                             const KvPageTable& pages, int tq, int hq, int hkv, int d, int q_offset,
                             int q_stride) override;
  void AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout, ConstOperand out,
                         const float* lse, ConstOperand q, ConstOperand k, ConstOperand v, int b,
                         int t, int hq, int hkv, int d, int q_stride, int kv_stride) override;
  void CrossEntropy(float* losses, float* max_prob, Operand dlogits, ConstOperand logits,
                    const int32_t* targets, const float* weights, bool by_confidence, int n,
                    int v) override;
  void CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                             const float* sum_exp, const float* target_logit, int n) override {
    cpu_->CrossEntropyFromStats(losses, max_prob, row_max, sum_exp, target_logit, n);
  }
  void CrossEntropyGradRange(Operand dlogits, ConstOperand logits, const float* row_max,
                             const float* sum_exp, const int32_t* targets, const float* weights,
                             bool by_confidence, int n, int v, int start) override;

 private:
  std::unique_ptr<Backend> cpu_;
  std::function<bool(int)> fused_attention_;
  std::function<bool(int)> cudnn_graphs_;
};

// The values of x[0, n) as fp32 (exact for bf16), or rounded to bf16 values when `round`.
std::vector<float> OperandValues(ConstOperand x, size_t n, bool round = false);

}  // namespace eellm::testing
