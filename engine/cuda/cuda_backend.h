// CudaBackend: the Backend contract (engine/backend.h) on an NVIDIA GPU, fp32 throughout.
// This first version is the correctness baseline, checked op by op against the CPU backend
// (tests/gpu): GEMMs are cuBLAS SGEMM (no TF32), attention runs per (sequence, head) as two
// GEMMs around a row softmax (like the CPU backend), the other ops are simple kernels with
// deterministic reductions. Everything runs in order on the legacy default stream, so host
// copies are synchronous. In bf16 mode ("cuda-bf16") GEMMs run on tensor cores with bf16
// operands and attention runs fused (flash_attention.cu: FlashAttention-2 style, bf16 tensor
// cores, deterministic backward); fp32 storage stays everywhere. Mixed precision
// ("cuda-bf16w") stores operands in bf16 and runs the GEMMs with a bias, a bias gradient or a
// separate residual input through cuBLASLt (lt_gemm.h), in the GEMM epilogues; there the
// training path's attention goes first to cuDNN's fused flash attention (cudnn_attention.h:
// builds with cuDNN, head dims 64-128), else to the fused kernels. The attention methods live in
// cuda_backend_attention.cc.
//
// Host code here is compiled by the host compiler; kernels live in the *.cu files behind
// cuda_kernels.h. Only engine/cuda includes CUDA headers.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/cudnn_attention.h"
#include "engine/cuda/device_tables.h"
#include "engine/cuda/host_staging.h"
#include "engine/cuda/lt_gemm.h"
#include "engine/cuda/stale_ranges.h"

namespace eellm {

namespace cuda {
// An operand as the kernels' launchers take it.
inline Elems ToElems(ConstOperand x) { return {const_cast<void*>(x.data), x.is_bf16()}; }
}  // namespace cuda

class CudaBackend final : public Backend {
 public:
  // How GEMMs (Linear and attention) compute: kFp32, plain fp32 (the correctness baseline,
  // checked element by element against the CPU); kBf16Gemm, operands rounded to bf16 inside
  // cuBLAS (CUBLAS_COMPUTE_32F_FAST_16BF: tensor cores, fp32 accumulation and outputs), with
  // fp32 storage everywhere else.
  // kBf16Weights ("cuda-bf16w", mixed precision): registered weights (RegisterWeights) have a
  // bf16 copy, refreshed at the first GEMM after anything wrote them, and operands
  // (operand_dtype()) are stored in bf16, so GEMMs multiply bf16 by bf16 (tensor cores, fp32
  // accumulation); an fp32 side that is neither is converted first.
  enum class GemmPrecision { kFp32, kBf16Gemm, kBf16Weights };
  CudaBackend(int device, GemmPrecision precision);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::kCuda; }
  // cuda-bf16w keeps operands (engine/tensor/operand.h: GEMM and attention inputs and outputs,
  // the KV cache) in bf16.
  DType operand_dtype() const override {
    return precision_ == GemmPrecision::kBf16Weights ? DType::kBF16 : DType::kF32;
  }
  std::string name() const override {
    return precision_ == GemmPrecision::kFp32       ? "cuda"
           : precision_ == GemmPrecision::kBf16Gemm ? "cuda-bf16"
                                                    : "cuda-bf16w";
  }

  void* Alloc(size_t bytes) override;
  int64_t AvailableMemoryBytes() const override;  // cudaMemGetInfo's free bytes
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
  // The fused kernel reads the keys through the page table; the per-head path gathers them.
  void PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                             const KvPageTable& pages, int tq, int hq, int hkv, int d, int q_offset,
                             int q_stride) override;
  // With the fused kernels: the new keys and values in one launch and every segment's attention
  // in another, their descriptors uploaded once while they stay the same (a pass's layers).
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
  // One launch for every run (the runs' table uploaded once per distinct run list).
  void AdamWRuns(float* p, const float* g, float* m, float* v, const std::vector<AdamWRun>& runs,
                 float lr, float beta1, float beta2, float eps, float weight_decay,
                 int step) override;

  void RegisterWeights(const float* p, size_t n) override;
  void UnregisterWeights(const float* p) override;
  void WeightsChanged(const float* first, size_t n) override;

 private:
  // Row-major C[M, N] = alpha op(A) op(B) + beta C with leading dimensions in elements.
  // With a bf16 operand (or a registered weight in kBf16Weights), both operands are multiplied as
  // bf16: the fp32 one becomes bf16 (its weight copy, or converted into scratch).
  // A bf16 C (written with fp32 accumulation) also makes both operands bf16.
  // Epilogues: `bias` (fp32 [N], C's rows packed; added as bf16 to a bf16 C) is added to every
  // row before C's one rounding; `a_row_sums` (fp32 [M], A transposed and packed) gets the sums
  // over k of op(A) as multiplied (bf16 on the bf16 path), added to it. In kBf16Weights they run
  // in cuBLASLt's epilogue (lt_gemm.h), elsewhere (or where cuBLASLt has no algorithm) as
  // kernels after the GEMM. GEMMs without either, or c_in, run on cublasGemmEx.
  // `c_in` (fp32, C's layout), when given, is what beta scales instead of C (C only written).
  void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, ConstOperand a, int lda,
            ConstOperand b, int ldb, float beta, Operand c, int ldc, const float* bias = nullptr,
            float* a_row_sums = nullptr, const float* c_in = nullptr);
  // x as bf16 bits: itself, a registered weight's copy, or converted into scratch slot `slot`
  // (its first `count` elements).
  const uint16_t* AsBf16(ConstOperand x, size_t count, int slot);
  // The bf16 copy of weights at `p` (refreshed if stale), or null when p is no registered weight
  // or the precision keeps none.
  const uint16_t* Bf16Weights(const float* p);
  // Marks the bf16 copies overlapping [dst, dst + bytes) stale.
  void MarkWritten(const void* dst, size_t bytes);
  // Whether attention with head_dim d on these tensors runs the fused kernels
  // (flash_attention.cu): in bf16 mode, for the head dimensions they support, `tensors` and the
  // strides of their rows (`row_bytes`, beside the dense ones) 16-byte aligned.
  bool UseFlash(int d, std::initializer_list<const void*> tensors,
                std::initializer_list<size_t> row_bytes) const;
  // Whether attention of `shape` goes to cuDNN first (cudnn_attention_): the operands `bf16`
  // (one of each dtype group: q's, out's or the gradients') in bf16, `tensors` and q's and k,
  // v's row strides 16-byte aligned.
  bool UseCudnn(const cuda::AttentionShape& shape, std::initializer_list<ConstOperand> bf16,
                std::initializer_list<const void*> tensors) const;
  // Device scratch of at least `bytes` in slot `slot` (grows on demand, outside steady state).
  void* Scratch(size_t bytes, int slot);
  // RoPE's table of each token's cos and sin (2 n (head_dim / 2) floats, scratch slot 12).
  float* RopeTable(int n, int head_dim);
  // Slot 10: the partial sums of a column sum (bias or norm gain gradients) over n rows of `cols`
  // columns, for `sums` sums; null where the rows are not split.
  double* ColumnSumScratch(int n, int cols, int sums);
  // Slot 10 for a norm backward's gain (and bias) gradient sums over n rows of c columns.
  double* NormScratch(int n, int c, int sums);

  int device_ = 0;
  int sm_count_ = 0;  // the device's SMs (the decoding kernel's split plan)
  GemmPrecision precision_ = GemmPrecision::kFp32;
  cudaStream_t stream_ = nullptr;  // the legacy default stream
  cublasHandle_t cublas_ = nullptr;
  void* gemm_workspace_ = nullptr;    // cuBLAS's and cuBLASLt's (LtGemm::kWorkspaceBytes)
  std::unique_ptr<cuda::LtGemm> lt_;  // kBf16Weights: the bf16 GEMMs, with epilogues
  bool tune_gemms_ = false;           // EELLM_GEMM_TUNE=1 (see the constructor)
  // kBf16Weights with cuDNN: the training path's attention (null: the fused kernels run it).
  std::unique_ptr<cuda::CudnnAttention> cudnn_attention_;
  struct Slot {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  // 0-1 attention, 2 SumSquares partials, 3 and 6 bf16 GEMM operands (A and B side), 4 bf16
  // dout of LinearBackward, 5 fp32 attention output, or dq|dk|dv, before their conversion to
  // bf16 (unfused path), 7 a bias as bf16 or a bias gradient (GEMM epilogues), 8-9 a paged
  // cache's keys and values gathered in order (unfused path), 10 column sums' partials, 11 a
  // paged attention pass's descriptors, 12 RoPE's cos and sin table, 13 unused.
  static constexpr int kDecodeScratch = 14;     // the decoding kernel's split states
  static constexpr int kEmbeddingScratch = 15;  // the embedding gradient's sorted tokens
  Slot scratch_[16];
  // AdamWRuns' and SumSquaresRanges' tables on the device, per distinct run list.
  cuda::DeviceTables<AdamWRun, cuda::AdamWRunEntry> adamw_tables_;
  cuda::DeviceTables<Range, cuda::SquaresBlock> squares_tables_;
  // What slot 11 holds: the last pass descriptors uploaded (bytes), and where.
  std::vector<unsigned char> pass_descriptors_;
  const void* pass_descriptors_at_ = nullptr;
  struct WeightCopy {
    const float* base = nullptr;
    size_t n = 0;
    uint16_t* bf16 = nullptr;
    cuda::StaleRanges stale;  // elements bf16 no longer matches
  };
  // Stale ranges of a weight copy closer than this (elements) are converted as one: the gap
  // costs about as much to convert (6 MB moved, ~2 us on an H100) as a launch more.
  static constexpr size_t kStaleGap = size_t{1} << 20;
  std::vector<WeightCopy> weights_;
  std::vector<double> host_partials_;
  cuda::HostStaging staging_;  // CopyFromHost's pinned ring (no host stall per small upload)
};

}  // namespace eellm
