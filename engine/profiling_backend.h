// ProfilingBackend: wraps another Backend and measures every op: wall time and call count per
// op name (the inner backend is synchronised around each timed op while timing is on, so GPU
// times are the ops' own), the op's work (FLOPs of its matrix products, and the bytes it must
// move at least: every input read and every output written once, in its dtype), and the bytes
// allocated through it (current and peak). Used by `eellm bench train` for the per-op breakdown
// against the hardware's limits; costs nothing but a map lookup when off.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>

#include "engine/backend.h"

namespace eellm {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(Backend* inner) : inner_(inner) {}

  struct OpStats {
    double seconds = 0;
    int64_t calls = 0;
    double flops = 0;  // of matrix products (GEMMs, attention)
    double bytes = 0;  // the minimum memory traffic
  };
  void set_timing(bool on) { timing_ = on; }
  void ResetStats() {
    stats_.clear();
    gemm_shapes_.clear();
  }
  const std::map<std::string, OpStats>& stats() const { return stats_; }
  // The GEMM ops again, keyed by op and shape ("Linear 8192 x 2048 <- 2048, bf16 out"): which
  // products of a step run below the GEMM ceiling.
  const std::map<std::string, OpStats>& gemm_shapes() const { return gemm_shapes_; }
  size_t allocated_bytes() const { return allocated_; }
  size_t peak_bytes() const { return peak_; }
  int64_t alloc_calls() const { return alloc_calls_; }
  // Calls that make the host wait for the device, counted whether timing is on or not: reads
  // (CopyToHost, and the sums of squares, which return a value), Synchronize. (A GPU backend's
  // CopyFromHost does not wait for small copies: engine/cuda/host_staging.h.)
  int64_t host_waits() const { return host_waits_; }

  Device device() const override;
  std::string name() const override;
  DType operand_dtype() const override { return inner_->operand_dtype(); }
  void* Alloc(size_t bytes) override;
  int64_t AvailableMemoryBytes() const override { return inner_->AvailableMemoryBytes(); }
  void Free(void* p) override;
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  void CopyFromHost(void* dst, const void* host_src, size_t bytes) override;
  void Copy(void* dst, const void* src, size_t bytes) override;
  void CopyRows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                int rows) override;
  void Synchronize() override;
  void Fill(float* x, size_t n, float value) override;
  void Add(float* y, const float* a, const float* b, size_t n) override;
  void Axpy(float* y, float alpha, const float* x, size_t n) override;
  void Scale(Operand x, float alpha, size_t n) override;
  void ToFloat(float* out, ConstOperand in, size_t n) override;
  double SumSquares(const float* x, size_t n) override;
  double SumSquaresRanges(const float* x, const std::vector<Range>& ranges) override;
  void EmbeddingForward(float* out, const int32_t* ids, const float* table, int n, int c) override;
  void EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) override;
  void EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                         int c) override;
  void Linear(Operand out, ConstOperand in, const float* w, const float* bias, int n, int in_dim,
              int out_dim, bool accumulate) override;
  void LinearResidual(float* out, const float* residual, ConstOperand in, const float* w,
                      const float* bias, int n, int in_dim, int out_dim) override;
  void LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout, ConstOperand in,
                      const float* w, int n, int in_dim, int out_dim, bool accumulate_din) override;
  void LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w, const float* bias,
                  int n, int in_dim, int out_dim) override;
  void LinearBackwardGelu(Operand dpre, float* dw, float* dbias, ConstOperand dout,
                          ConstOperand act, ConstOperand pre, const float* w, int n, int in_dim,
                          int out_dim) override;
  void LayerNormForward(Operand out, float* mean, float* rstd, const float* x, const float* g,
                        const float* b, int n, int c, float eps) override;
  void LayerNormBackward(float* dx, const float* dres, float* dg, float* db, const float* dout,
                         const float* x, const float* g, const float* mean, const float* rstd,
                         int n, int c) override;
  void RmsNormForward(Operand out, float* rstd, const float* x, const float* g, int n, int c,
                      float eps) override;
  void RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout, const float* x,
                       const float* g, const float* rstd, int n, int c) override;
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
  void RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim, int stride,
                   const RopeParams& rope) override;
  void RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim, int stride,
                    const RopeParams& rope) override;
  void AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k, ConstOperand v,
                        int b, int tq, int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                        int q_stride, int kv_stride) override;
  void PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                             const KvPageTable& pages, int tq, int hq, int hkv, int d, int q_offset,
                             int q_stride) override;
  void PagedAttentionPass(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                          Operand k_pool, Operand v_pool, const std::vector<PagedRows>& segments,
                          int hq, int hkv, int d, int q_stride, int kv_stride) override;
  void AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout, ConstOperand out,
                         const float* lse, ConstOperand q, ConstOperand k, ConstOperand v, int b,
                         int t, int hq, int hkv, int d, int q_stride, int kv_stride) override;
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
  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int step) override;
  void AdamWRuns(float* p, const float* g, float* m, float* v, const std::vector<AdamWRun>& runs,
                 float lr, float beta1, float beta2, float eps, float weight_decay,
                 int step) override;
  void RegisterWeights(const float* p, size_t n) override { inner_->RegisterWeights(p, n); }
  void UnregisterWeights(const float* p) override { inner_->UnregisterWeights(p); }
  void WeightsChanged(const float* first, size_t n) override { inner_->WeightsChanged(first, n); }

 private:
  // Times one op when timing is on: synchronises before and after.
  class Timed {
   public:
    // `shape`: a GEMM op's shape, its key in gemm_shapes() ("" for other ops).
    Timed(ProfilingBackend* b, const char* op, double flops = 0, double bytes = 0,
          std::string shape = "");
    ~Timed();

   private:
    ProfilingBackend* b_;
    const char* op_;
    double flops_, bytes_;
    std::string shape_;
    std::chrono::steady_clock::time_point start_;
  };

  // A GEMM op's key in gemm_shapes(): op, rows x out <- in, then `what()` (the dtypes and what
  // else it does); "" without building anything when timing is off (the benchmark's timed steps).
  template <typename What>
  std::string GemmShape(const char* op, int n, int in_dim, int out_dim, What what) const {
    if (!timing_) return "";
    return std::string(op) + " " + std::to_string(n) + " x " + std::to_string(out_dim) + " <- " +
           std::to_string(in_dim) + ", " + what();
  }
  // The least traffic of a Linear: in, the weights, `out_bytes` of output, the bias.
  double LinearBytes(ConstOperand in, bool bias, int n, int in_dim, int out_dim,
                     double out_bytes) const;

  Backend* inner_;
  bool timing_ = false;
  std::map<std::string, OpStats> stats_;
  std::map<std::string, OpStats> gemm_shapes_;
  std::unordered_map<void*, size_t> live_;
  size_t allocated_ = 0, peak_ = 0;
  int64_t alloc_calls_ = 0;
  int64_t host_waits_ = 0;
};

}  // namespace eellm
