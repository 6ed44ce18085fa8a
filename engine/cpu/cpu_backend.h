// CpuBackend: the reference implementation of the Backend contract (engine/backend.h) on host
// memory. fp32 throughout; GEMMs go to OpenBLAS (cblas_sgemm), the other ops are plain loops
// parallelised with OpenMP over independent rows, heads or columns, so every result is
// deterministic (no reduction whose order depends on thread scheduling). This backend is the
// numerical oracle other backends are tested against.
//
// The implementation is split by op family: cpu_memory.cc, cpu_linear.cc, cpu_norm.cc,
// cpu_activation.cc, cpu_rope.cc, cpu_attention.cc, cpu_cross_entropy.cc, cpu_adamw.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/backend.h"

namespace eellm {

class CpuBackend final : public Backend {
 public:
  CpuBackend() = default;
  ~CpuBackend() override = default;

  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }

  // ---- memory (cpu_memory.cc) ---------------------------------------------------------------
  void* Alloc(size_t bytes) override;
  int64_t AvailableMemoryBytes() const override;  // cpu_available_memory.cc
  void Free(void* p) override;
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  void CopyFromHost(void* dst, const void* host_src, size_t bytes) override;
  void Copy(void* dst, const void* src, size_t bytes) override;
  void Synchronize() override {}

  // ---- elementwise and reductions (cpu_memory.cc) -------------------------------------------
  void Fill(float* x, size_t n, float value) override;
  void Add(float* y, const float* a, const float* b, size_t n) override;
  void Axpy(float* y, float alpha, const float* x, size_t n) override;
  void Scale(Operand x, float alpha, size_t n) override;
  void ToFloat(float* out, ConstOperand in, size_t n) override;
  double SumSquares(const float* x, size_t n) override;

  // ---- embedding (cpu_memory.cc) ------------------------------------------------------------
  // ids: [n], table/dtable: [vocab, c], out/dout: [n, c].
  void EmbeddingForward(float* out, const int32_t* ids, const float* table, int n, int c) override;
  void EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) override;
  void EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                         int c) override;

  // ---- linear (cpu_linear.cc) ---------------------------------------------------------------
  // in: [n, in_dim], w: [out_dim, in_dim], bias: [out_dim], out: [n, out_dim].
  void Linear(Operand out, ConstOperand in, const float* w, const float* bias, int n, int in_dim,
              int out_dim, bool accumulate) override;
  void LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout, ConstOperand in,
                      const float* w, int n, int in_dim, int out_dim, bool accumulate_din) override;

  // ---- norms (cpu_norm.cc) ------------------------------------------------------------------
  // x/out/dout/dx: [n, c]; g, b, dg, db: [c]; mean, rstd: [n].
  void LayerNormForward(Operand out, float* mean, float* rstd, const float* x, const float* g,
                        const float* b, int n, int c, float eps) override;
  void LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                         const float* x, const float* g, const float* mean, const float* rstd,
                         int n, int c) override;
  void RmsNormForward(Operand out, float* rstd, const float* x, const float* g, int n, int c,
                      float eps) override;
  void RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout, const float* x,
                       const float* g, const float* rstd, int n, int c) override;

  // ---- activations (cpu_activation.cc) ------------------------------------------------------
  void GeluForward(Operand out, ConstOperand x, size_t n) override;
  void GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) override;
  void SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows, int cols,
                     int stride) override;
  void SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout, ConstOperand gate,
                      ConstOperand up, int rows, int cols, int stride) override;
  void DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                  uint64_t key, int64_t row0) override;
  void DropoutBackward(float* dbranch, const float* dout, int n, int c, float p, uint64_t key,
                       int64_t row0) override;

  // ---- rotary position embedding (cpu_rope.cc) ----------------------------------------------
  // x/dx: n rows `stride` apart, each starting with [heads, head_dim]; pos: [n].
  void RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim, int stride,
                   const RopeParams& rope) override;
  void RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim, int stride,
                    const RopeParams& rope) override;

  // ---- attention (cpu_attention.cc) ---------------------------------------------------------
  // q/out: [b, tq, hq, d]; k/v: [b, tk_cap, hkv, d]; lse: [b, hq, tq].
  void AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k, ConstOperand v,
                        int b, int tq, int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                        int q_stride, int kv_stride) override;
  // q/out: [tq, hq, d] (q's rows q_stride apart); k/v: pools [rows, hkv, d] (engine/kv_pages.h).
  void PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                             const KvPageTable& pages, int tq, int hq, int hkv, int d, int q_offset,
                             int q_stride) override;
  // dout/out: [b, t, hq, d]; lse: [b, hq, t]; q, dq: rows of [hq, d], k, v, dk, dv: rows of
  // [hkv, d], q_stride and kv_stride elements apart.
  void AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout, ConstOperand out,
                         const float* lse, ConstOperand q, ConstOperand k, ConstOperand v, int b,
                         int t, int hq, int hkv, int d, int q_stride, int kv_stride) override;

  // ---- softmax cross-entropy (cpu_cross_entropy.cc) -----------------------------------------
  // logits/dlogits: [n, v]; losses, max_prob, targets, weights: [n].
  void CrossEntropy(float* losses, float* max_prob, Operand dlogits, ConstOperand logits,
                    const int32_t* targets, const float* weights, bool by_confidence, int n,
                    int v) override;
  void EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n, int c,
                             int start, int rows) override;
  void EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n, int c,
                              int start, int rows) override;
  void RowMax(float* row_max, ConstOperand logits, int n, int v) override;
  void SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                       const float* row_max, const int32_t* targets, int n, int v,
                       int start) override;
  void CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                             const float* sum_exp, const float* target_logit, int n) override;
  void CrossEntropyGradRange(Operand dlogits, ConstOperand logits, const float* row_max,
                             const float* sum_exp, const int32_t* targets, const float* weights,
                             bool by_confidence, int n, int v, int start) override;

  // ---- optimizer (cpu_adamw.cc) -------------------------------------------------------------
  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int step) override;
};

}  // namespace eellm
