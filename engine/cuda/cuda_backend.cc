// CudaBackend: construction, memory, GEMM and the host side of every op (kernel launches in
// cuda_kernels.h).
#include "engine/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/core/adamw_update.h"
#include "engine/core/status.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/make_cuda_backend.h"

namespace eellm {

using cuda::ToElems;

namespace {
// The cuBLASLt problem of row-major C[M, N] = alpha op(A) op(B) + beta C on bf16 A and B:
// column-major C^T = op(B)^T op(A)^T, the operands swapped (see CudaBackend::Gemm).
cuda::LtGemm::Problem RowMajorLtProblem(bool trans_a, bool trans_b, int m, int n, int k,
                                        float alpha, const uint16_t* a16, int lda,
                                        const uint16_t* b16, int ldb, float beta, Operand c,
                                        int ldc) {
  cuda::LtGemm::Problem p;
  p.op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.m = n;
  p.n = m;
  p.k = k;
  p.alpha = alpha;
  p.beta = beta;
  p.a = b16;
  p.lda = ldb;
  p.b = a16;
  p.ldb = lda;
  p.d = c.data;
  p.ldd = ldc;
  p.d_bf16 = c.is_bf16();
  return p;
}
}  // namespace

int CudaDeviceCount() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::string CudaDeviceBusId(int device) {
  const int count = CudaDeviceCount();
  if (count == 0) return "";
  char id[32] = {};
  if (cudaDeviceGetPCIBusId(id, sizeof(id), device % count) != cudaSuccess) return "";
  return id;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device, bool bf16_gemm,
                                                         bool bf16_weights) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    return absl::UnavailableError(
        absl::StrCat("no CUDA GPU available (",
                     err != cudaSuccess ? cudaGetErrorString(err) : "0 devices", ")"));
  }
  if (device < 0) {
    CUDA_CHECK(cudaGetDevice(&device));
  } else {
    device %= count;
  }
  return std::unique_ptr<Backend>(
      new CudaBackend(device, !bf16_gemm     ? CudaBackend::GemmPrecision::kFp32
                              : bf16_weights ? CudaBackend::GemmPrecision::kBf16Weights
                                             : CudaBackend::GemmPrecision::kBf16Gemm));
}

CudaBackend::CudaBackend(int device, GemmPrecision precision)
    : device_(device), precision_(precision) {
  CUDA_CHECK(cudaSetDevice(device_));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  CUBLAS_CHECK(cublasCreate(&cublas_));
  CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // The workspace PyTorch gives cuBLAS on Hopper (32 MiB; split-K and stream-K kernels need one),
  // allocated here rather than from cuBLAS's own pool. Set after the stream: cublasSetStream
  // resets it. Shared with cuBLASLt's GEMMs, which run on the same stream.
  CUDA_CHECK(cudaMalloc(&gemm_workspace_, cuda::LtGemm::kWorkspaceBytes));
  CUBLAS_CHECK(cublasSetWorkspace(cublas_, gemm_workspace_, cuda::LtGemm::kWorkspaceBytes));
  // fp32: plain fp32 GEMMs (no TF32), checked element by element against the CPU.
  CUBLAS_CHECK(cublasSetMathMode(
      cublas_, precision_ == GemmPrecision::kFp32 ? CUBLAS_PEDANTIC_MATH : CUBLAS_DEFAULT_MATH));
  if (precision_ == GemmPrecision::kBf16Weights) {
    // EELLM_GEMM_TUNE=1: each large GEMM shape's first run times cuBLASLt's candidate algorithms
    // and keeps the fastest (lt_gemm.h), and large GEMMs without epilogues go through cuBLASLt
    // too, so that all of them are tuned.
    const char* tune = std::getenv("EELLM_GEMM_TUNE");
    tune_gemms_ = tune != nullptr && std::string(tune) == "1";
    lt_ = std::make_unique<cuda::LtGemm>(stream_, gemm_workspace_, tune_gemms_);
    cudnn_attention_ = cuda::CudnnAttention::Create(stream_);
  }
}

CudaBackend::~CudaBackend() {
  cudaDeviceSynchronize();
  for (Slot& s : scratch_) cudaFree(s.ptr);
  for (WeightCopy& w : weights_) cudaFree(w.bf16);
  lt_.reset();
  cudnn_attention_.reset();
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  cudaFree(gemm_workspace_);
}

void* CudaBackend::Alloc(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes > 0 ? bytes : 256));  // 256-byte aligned
  return p;
}

int64_t CudaBackend::AvailableMemoryBytes() const {
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return -1;
  return static_cast<int64_t>(free_bytes);
}

void CudaBackend::Free(void* p) {
  if (p != nullptr) CUDA_CHECK(cudaFree(p));
}

void CudaBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost));
}

void CudaBackend::CopyFromHost(void* dst, const void* host_src, size_t bytes) {
  MarkWritten(dst, bytes);
  if (bytes == 0 || staging_.CopyToDevice(dst, host_src, bytes, stream_)) return;
  // Large copies (parameters, checkpoints) directly: this waits for the stream first.
  CUDA_CHECK(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice));
}

void CudaBackend::Copy(void* dst, const void* src, size_t bytes) {
  MarkWritten(dst, bytes);
  if (bytes && dst != src) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
}

void CudaBackend::CopyRows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                           size_t row_bytes, int rows) {
  if (rows <= 0 || row_bytes == 0) return;
  MarkWritten(dst, dst_pitch * (rows - 1) + row_bytes);
  CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                               cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::Synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

void* CudaBackend::Scratch(size_t bytes, int slot) {
  Slot& s = scratch_[slot];
  if (s.bytes < bytes) {
    // Stream-ordered: the old buffer is released after the queued work that uses it, without
    // waiting for the whole device (a cudaFree would also wait for NCCL kernels in flight).
    if (s.ptr != nullptr) CUDA_CHECK(cudaFreeAsync(s.ptr, stream_));
    CUDA_CHECK(cudaMallocAsync(&s.ptr, bytes, stream_));
    s.bytes = bytes;
  }
  return s.ptr;
}

float* CudaBackend::RopeTable(int n, int head_dim) {
  return static_cast<float*>(
      Scratch(2 * sizeof(float) * n * static_cast<size_t>(head_dim / 2), 12));
}

double* CudaBackend::ColumnSumScratch(int n, int cols, int sums) {
  return static_cast<double*>(Scratch(cuda::ColumnSumScratchBytes(n, cols, sums), 10));
}

double* CudaBackend::NormScratch(int n, int c, int sums) {
  return static_cast<double*>(Scratch(cuda::NormBackwardScratchBytes(n, c, sums), 10));
}

void CudaBackend::Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, ConstOperand a,
                       int lda, ConstOperand b, int ldb, float beta, Operand c, int ldc,
                       const float* bias, float* a_row_sums, const float* c_in) {
  EE_CHECK(bias == nullptr || a_row_sums == nullptr, "a GEMM with both epilogues");
  EE_CHECK(c_in == nullptr || (!c.is_bf16() && ldc == n), "a separate C needs a packed fp32 C");
  EE_CHECK(bias == nullptr || !c.is_bf16() || beta == 0.0f,
           "a GEMM bias with a bf16 C to accumulate into");
  EE_CHECK(a_row_sums == nullptr || alpha == 1.0f, "row sums of op(A) with alpha != 1");
  EE_CHECK(bias == nullptr || ldc == n, "a GEMM bias needs packed rows of C");
  EE_CHECK(a_row_sums == nullptr || (trans_a && lda == m),
           "row sums of op(A) need a transposed, packed A (the column sums of A as stored)");
  // Where the GEMM reads C from C itself: the separate input copied there first.
  auto c_from_input = [&]() {
    if (c_in != nullptr && c_in != c.data)
      Copy(c.data, c_in, static_cast<size_t>(m) * n * sizeof(float));
  };
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  // The epilogues as separate kernels: after the GEMM, with A as it was multiplied.
  auto epilogues = [&](ConstOperand a_used) {
    if (bias != nullptr) CUDA_CHECK(cuda::AddBias(ToElems(c), ToElems(c), bias, m, n, stream_));
    if (a_row_sums != nullptr) {
      CUDA_CHECK(cuda::ColumnSumAdd(a_row_sums, ToElems(a_used), k, m, ColumnSumScratch(k, m, 1),
                                    stream_));
    }
  };
  if (!a.is_bf16() && !b.is_bf16() && !c.is_bf16()) {
    const uint16_t* a_w = Bf16Weights(a.f32());
    const uint16_t* b_w = Bf16Weights(b.f32());
    if (precision_ == GemmPrecision::kFp32) {
      c_from_input();
      CUBLAS_CHECK(cublasSgemm(cublas_, op_b, op_a, n, m, k, &alpha, b.f32(), ldb, a.f32(), lda,
                               &beta, c.f32(), ldc));
      epilogues(a);
      return;
    }
    if (a_w == nullptr && b_w == nullptr) {
      c_from_input();
      CUBLAS_CHECK(cublasGemmEx(cublas_, op_b, op_a, n, m, k, &alpha, b.data, CUDA_R_32F, ldb,
                                a.data, CUDA_R_32F, lda, &beta, c.data, CUDA_R_32F, ldc,
                                CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
      epilogues(a);
      return;
    }
    EE_CHECK(a_w == nullptr || b_w == nullptr, "a GEMM of two weights");
    if (a_w != nullptr) a = ConstOperand(a_w, DType::kBF16);
    if (b_w != nullptr) b = ConstOperand(b_w, DType::kBF16);
  }
  // bf16 by bf16 with fp32 accumulation; C fp32 or bf16. An fp32 side becomes bf16: a registered
  // weight's copy, or converted into its side's scratch (its strided extent, the last row only up
  // to its width).
  auto extent = [](int rows, int cols, int ld) {
    return rows > 0 && cols > 0 ? static_cast<size_t>(rows - 1) * ld + static_cast<size_t>(cols)
                                : size_t{0};
  };
  const uint16_t* a16 = AsBf16(a, trans_a ? extent(k, m, lda) : extent(m, k, lda), 3);
  const uint16_t* b16 = AsBf16(b, trans_b ? extent(n, k, ldb) : extent(k, n, ldb), 6);
  const ConstOperand a_used(a16, DType::kBF16);
  // cuBLASLt for what cublasGemmEx cannot do (epilogues, C != D); cublasGemmEx otherwise, so that
  // GEMMs whose sizes vary call by call (attention's per-head path in decoding) build no plans.
  // When tuning, large GEMMs too (at least 2^30 multiply-adds: a training step's, not the varying
  // sizes of decoding, each of which would be tuned).
  const bool lt_wanted = bias != nullptr || a_row_sums != nullptr || c_in != nullptr ||
                         (tune_gemms_ && static_cast<double>(m) * n * k >= 1073741824.0);
  if (lt_ != nullptr && lt_wanted && (a_row_sums == nullptr || !c.is_bf16())) {
    // cuBLASLt, column-major with the operands swapped as above: the bias runs over D's rows
    // (our columns), the row sums of op(A) are the column sums of op(B') over k (BGRADB). A bias
    // has C's dtype in the epilogue: a bf16 C adds the bias as bf16.
    cuda::LtGemm::Problem p =
        RowMajorLtProblem(trans_a, trans_b, m, n, k, alpha, a16, lda, b16, ldb, beta, c, ldc);
    if (bias != nullptr) {
      p.bias = c.is_bf16() ? static_cast<const void*>(AsBf16(ConstOperand(bias), n, 7)) : bias;
    }
    p.c = c_in;
    if (a_row_sums != nullptr) p.bias_grad = static_cast<float*>(Scratch(m * sizeof(float), 7));
    if (lt_->Run(p)) {
      if (a_row_sums != nullptr) CUDA_CHECK(cuda::Axpy(a_row_sums, 1.0f, p.bias_grad, m, stream_));
      return;
    }
  }
  // cublasGemmEx and the epilogues as kernels. With a bias and a bf16 C the product goes to fp32
  // scratch first, so that C is rounded once with the bias added, as in the epilogue.
  if (bias != nullptr && c.is_bf16()) {
    auto* acc = static_cast<float*>(Scratch(static_cast<size_t>(m) * n * sizeof(float), 5));
    CUBLAS_CHECK(cublasGemmEx(cublas_, op_b, op_a, n, m, k, &alpha, b16, CUDA_R_16BF, ldb, a16,
                              CUDA_R_16BF, lda, &beta, acc, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
    CUDA_CHECK(cuda::AddBias(ToElems(c), ToElems(ConstOperand(acc)), bias, m, n, stream_));
    return;
  }
  c_from_input();
  CUBLAS_CHECK(cublasGemmEx(cublas_, op_b, op_a, n, m, k, &alpha, b16, CUDA_R_16BF, ldb, a16,
                            CUDA_R_16BF, lda, &beta, c.data, c.is_bf16() ? CUDA_R_16BF : CUDA_R_32F,
                            ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  epilogues(a_used);
}

const uint16_t* CudaBackend::AsBf16(ConstOperand x, size_t count, int slot) {
  if (x.is_bf16()) return x.bf16_bits();
  if (const uint16_t* w = Bf16Weights(x.f32())) return w;
  auto* out = static_cast<uint16_t*>(Scratch(count * sizeof(uint16_t), slot));
  CUDA_CHECK(cuda::ToBf16(out, x.f32(), count, stream_));
  return out;
}

// ---- bf16 weight copies (kBf16Weights)
// ------------------------------------------------------------

void CudaBackend::RegisterWeights(const float* p, size_t n) {
  if (precision_ != GemmPrecision::kBf16Weights || p == nullptr || n == 0) return;
  WeightCopy w{p, n, nullptr, cuda::StaleRanges(n, kStaleGap)};
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&w.bf16), n * sizeof(uint16_t)));
  weights_.push_back(std::move(w));
}

void CudaBackend::UnregisterWeights(const float* p) {
  for (size_t i = 0; i < weights_.size(); ++i) {
    if (weights_[i].base != p) continue;
    CUDA_CHECK(cudaDeviceSynchronize());  // GEMMs may still read the copy
    CUDA_CHECK(cudaFree(weights_[i].bf16));
    weights_.erase(weights_.begin() + static_cast<std::ptrdiff_t>(i));
    return;
  }
}

void CudaBackend::WeightsChanged(const float* first, size_t n) {
  MarkWritten(first, n * sizeof(float));
}

void CudaBackend::MarkWritten(const void* dst, size_t bytes) {
  const auto* lo = static_cast<const char*>(dst);
  for (WeightCopy& w : weights_) {
    const auto* base = reinterpret_cast<const char*>(w.base);
    if (lo >= base + w.n * sizeof(float) || base >= lo + bytes) continue;
    const size_t begin = lo > base ? static_cast<size_t>(lo - base) / sizeof(float) : 0;
    const size_t end = (static_cast<size_t>(lo + bytes - base) + sizeof(float) - 1) / sizeof(float);
    w.stale.Mark(begin, end);
  }
}

const uint16_t* CudaBackend::Bf16Weights(const float* p) {
  for (WeightCopy& w : weights_) {
    if (p < w.base || p >= w.base + w.n) continue;
    for (const cuda::StaleRanges::Range& r : w.stale.ranges()) {
      CUDA_CHECK(cuda::ToBf16(w.bf16 + r.begin, w.base + r.begin, r.end - r.begin, stream_));
    }
    w.stale.Clear();
    return w.bf16 + (p - w.base);
  }
  return nullptr;
}

// ---- elementwise, reductions, embedding ---------------------------------------------------------

void CudaBackend::Fill(float* x, size_t n, float value) {
  MarkWritten(x, n * sizeof(float));
  CUDA_CHECK(cuda::Fill(x, n, value, stream_));
}
void CudaBackend::Add(float* y, const float* a, const float* b, size_t n) {
  MarkWritten(y, n * sizeof(float));
  CUDA_CHECK(cuda::Add(y, a, b, n, stream_));
}
void CudaBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  MarkWritten(y, n * sizeof(float));
  CUDA_CHECK(cuda::Axpy(y, alpha, x, n, stream_));
}
void CudaBackend::ToFloat(float* out, ConstOperand in, size_t n) {
  MarkWritten(out, n * sizeof(float));
  CUDA_CHECK(cuda::ToFloat(out, ToElems(in), n, stream_));
}
void CudaBackend::Scale(Operand x, float alpha, size_t n) {
  MarkWritten(x.data, n * DTypeSize(x.dtype));
  CUDA_CHECK(cuda::Scale(ToElems(x), alpha, n, stream_));
}

double CudaBackend::SumSquares(const float* x, size_t n) {
  if (n == 0) return 0.0;
  const size_t blocks = cuda::SumSquaresBlocks(n);
  auto* partial = static_cast<double*>(Scratch(blocks * sizeof(double), 2));
  CUDA_CHECK(cuda::SumSquaresPartials(partial, x, n, stream_));
  host_partials_.resize(blocks);
  CopyToHost(host_partials_.data(), partial, blocks * sizeof(double));
  double total = 0.0;
  for (double s : host_partials_) total += s;  // in block order: deterministic
  return total;
}

// Every range's blocks in one launch and one read-back (the gradient norm: one range per run of
// counted tensors, ~100 on a tensor-parallel rank other than 0, each a blocking read-back
// before); the partials added per range in block order, then the ranges in order, the sums
// SumSquares per range gives.
double CudaBackend::SumSquaresRanges(const float* x, const std::vector<Range>& ranges) {
  size_t blocks = 0;
  for (const Range& r : ranges) blocks += cuda::SumSquaresBlocks(r.count);
  if (blocks == 0) return 0.0;
  EE_CHECK(blocks <= static_cast<size_t>(std::numeric_limits<int>::max()), blocks,
           " sum-of-squares blocks");
  const cuda::SquaresBlock* table = squares_tables_.Get(
      ranges,
      [](const std::vector<Range>& rs) {
        std::vector<cuda::SquaresBlock> entries;
        for (const Range& r : rs) {
          for (size_t b = r.offset; b < r.offset + r.count; b += cuda::kSquaresBlock) {
            entries.push_back({b, std::min(b + cuda::kSquaresBlock, r.offset + r.count)});
          }
        }
        return entries;
      },
      stream_);
  auto* partial = static_cast<double*>(Scratch(blocks * sizeof(double), 2));
  CUDA_CHECK(cuda::SumSquaresTable(partial, x, table, static_cast<int>(blocks), stream_));
  host_partials_.resize(blocks);
  CopyToHost(host_partials_.data(), partial, blocks * sizeof(double));
  double total = 0.0;
  const double* next = host_partials_.data();
  for (const Range& r : ranges) {
    double range_total = 0.0;
    for (size_t b = cuda::SumSquaresBlocks(r.count); b > 0; --b) range_total += *next++;
    total += range_total;
  }
  return total;
}

void CudaBackend::EmbeddingForward(float* out, const int32_t* ids, const float* table, int n,
                                   int c) {
  EmbeddingForwardRange(out, ids, table, n, c, 0, std::numeric_limits<int>::max());
}
void CudaBackend::EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) {
  CUDA_CHECK(cuda::EmbeddingAdd(out, ids, table, n, c, stream_));
}
void CudaBackend::EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                                    int c) {
  EmbeddingBackwardRange(dtable, ids, dout, n, c, 0, std::numeric_limits<int>::max());
}
void CudaBackend::EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n,
                                        int c, int start, int rows) {
  CUDA_CHECK(cuda::EmbeddingForwardRange(out, ids, table, n, c, start, rows, stream_));
}
void CudaBackend::EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout,
                                         int n, int c, int start, int rows) {
  if (n <= 0 || c <= 0 || rows <= 0) return;
  const size_t bytes = cuda::EmbeddingBackwardScratchBytes(n, rows);
  CUDA_CHECK(cuda::EmbeddingBackwardRange(dtable, ids, dout, n, c, start, rows,
                                          Scratch(bytes, kEmbeddingScratch), bytes, stream_));
}

// ---- linear -------------------------------------------------------------------------------------

void CudaBackend::Linear(Operand out, ConstOperand in, const float* w, const float* bias, int n,
                         int in_dim, int out_dim, bool accumulate) {
  if (n <= 0 || out_dim <= 0) return;
  if (in_dim <= 0) {
    if (!accumulate) {
      const size_t bytes = static_cast<size_t>(n) * out_dim * DTypeSize(out.dtype);
      CUDA_CHECK(cudaMemsetAsync(out.data, 0, bytes, stream_));  // 0 in fp32 and bf16
    }
  } else {
    // out[n, o] = in[n, i] @ w[o, i]^T (+ out) + bias.
    Gemm(false, true, n, out_dim, in_dim, 1.0f, in, in_dim, w, in_dim, accumulate ? 1.0f : 0.0f,
         out, out_dim, bias);
    return;
  }
  if (bias != nullptr)
    CUDA_CHECK(cuda::AddBias(ToElems(out), ToElems(out), bias, n, out_dim, stream_));
}

void CudaBackend::LinearResidual(float* out, const float* residual, ConstOperand in, const float* w,
                                 const float* bias, int n, int in_dim, int out_dim) {
  if (n <= 0 || out_dim <= 0 || in_dim <= 0) {
    Backend::LinearResidual(out, residual, in, w, bias, n, in_dim, out_dim);
    return;
  }
  // out = residual + in @ w^T + bias: the GEMM reads the residual as C and writes out as D
  // (cuBLASLt), or copies it into out first (cuBLAS).
  Gemm(false, true, n, out_dim, in_dim, 1.0f, in, in_dim, w, in_dim, 1.0f, out, out_dim, bias,
       nullptr, residual);
}

void CudaBackend::LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout,
                                 ConstOperand in, const float* w, int n, int in_dim, int out_dim,
                                 bool accumulate_din) {
  if (n <= 0) return;
  EE_CHECK(!(accumulate_din && din.is_bf16()),
           "LinearBackward would accumulate din in bf16; accumulate into an fp32 din");
  // With a bf16 input and an fp32 dout (the residual stream's gradient; the heads' logit
  // gradients on backends with fp32 operands), dout is converted to bf16 once and both GEMMs
  // multiply bf16 by bf16.
  ConstOperand dout_op = dout;
  if (in.is_bf16() && !dout.is_bf16() && out_dim > 0 && in_dim > 0 &&
      (din.data != nullptr || dw != nullptr)) {
    const size_t count = static_cast<size_t>(n) * out_dim;
    auto* d16 = static_cast<uint16_t*>(Scratch(count * sizeof(uint16_t), 4));
    CUDA_CHECK(cuda::ToBf16(d16, dout.f32(), count, stream_));
    dout_op = ConstOperand(d16, DType::kBF16);
  }
  if (din.data != nullptr && in_dim > 0) {
    if (out_dim <= 0) {
      if (!accumulate_din) {
        const size_t bytes = static_cast<size_t>(n) * in_dim * DTypeSize(din.dtype);
        CUDA_CHECK(cudaMemsetAsync(din.data, 0, bytes, stream_));  // 0 in fp32 and bf16
      }
    } else {
      // din[n, i] = dout[n, o] @ w[o, i] (+ din).
      Gemm(false, false, n, in_dim, out_dim, 1.0f, dout_op, out_dim, w, in_dim,
           accumulate_din ? 1.0f : 0.0f, din, in_dim);
    }
  }
  if (out_dim <= 0) return;
  if (dw != nullptr && in_dim > 0) {
    // dw[o, i] += dout[n, o]^T @ in[n, i]; dbias += the column sums of dout as the GEMM reads it
    // (bf16 where it converts it).
    Gemm(true, false, out_dim, in_dim, n, 1.0f, dout_op, out_dim, in, in_dim, 1.0f, dw, in_dim,
         nullptr, dbias);
    return;
  }
  if (dbias != nullptr) {
    CUDA_CHECK(cuda::ColumnSumAdd(dbias, ToElems(dout_op), n, out_dim,
                                  ColumnSumScratch(n, out_dim, 1), stream_));
  }
}

// With bf16 pre and act (cuda-bf16w), the GELU runs on the fp32 product: in cuBLASLt's epilogue,
// or (where it has no algorithm) from an fp32 scratch product by one kernel that rounds pre and
// act once each, as the epilogue does. With fp32 ones, Linear and GeluForward compute the same.
void CudaBackend::LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w,
                             const float* bias, int n, int in_dim, int out_dim) {
  if (!pre.is_bf16() || act.dtype != pre.dtype || n <= 0 || in_dim <= 0 || out_dim <= 0) {
    Backend::LinearGelu(act, pre, in, w, bias, n, in_dim, out_dim);
    return;
  }
  const size_t count = static_cast<size_t>(n) * out_dim;
  if (lt_ != nullptr && out_dim % 8 == 0) {
    // act[n, o] = gelu(in[n, i] @ w[o, i]^T + bias), as Linear's GEMM, with pre beside it.
    cuda::LtGemm::Problem p = RowMajorLtProblem(
        false, true, n, out_dim, in_dim, 1.0f, AsBf16(in, static_cast<size_t>(n) * in_dim, 3),
        in_dim, AsBf16(ConstOperand(w), static_cast<size_t>(out_dim) * in_dim, 6), in_dim, 0.0f,
        act, out_dim);
    if (bias != nullptr) p.bias = AsBf16(ConstOperand(bias), out_dim, 7);
    p.activation = cuda::LtGemm::Problem::Activation::kGelu;
    p.aux = pre.data;
    p.aux_ld = out_dim;
    if (lt_->Run(p)) return;
  }
  auto* acc = static_cast<float*>(Scratch(count * sizeof(float), 5));
  Gemm(false, true, n, out_dim, in_dim, 1.0f, in, in_dim, w, in_dim, 0.0f, Operand(acc), out_dim);
  CUDA_CHECK(cuda::BiasGeluForward(ToElems(act), ToElems(pre), acc, bias, n, out_dim, stream_));
}

// With bf16 dpre and pre: dpre = bf16(bf16(dout @ w) * gelu'(pre)), the product rounded to bf16
// before gelu' multiplies it, as cuBLASLt's DGELU epilogue does with a bf16 output (measured on
// an H200: tests/gpu/operand_parity_test.cc) and as PyTorch's bf16 autocast does; where cuBLASLt
// has no algorithm, the same roundings from a bf16 product and GeluBackward in place.
void CudaBackend::LinearBackwardGelu(Operand dpre, float* dw, float* dbias, ConstOperand dout,
                                     ConstOperand act, ConstOperand pre, const float* w, int n,
                                     int in_dim, int out_dim) {
  if (!dpre.is_bf16() || !pre.is_bf16() || n <= 0 || in_dim <= 0 || out_dim <= 0) {
    Backend::LinearBackwardGelu(dpre, dw, dbias, dout, act, pre, w, n, in_dim, out_dim);
    return;
  }
  // dout as the GEMMs read it: bf16, converted once (as LinearBackward converts it).
  const ConstOperand dout16(AsBf16(dout, static_cast<size_t>(n) * out_dim, 4), DType::kBF16);
  LinearBackward(Operand(), dw, dbias, dout16, act, w, n, in_dim, out_dim, false);
  if (lt_ != nullptr && in_dim % 8 == 0) {
    // dpre[n, i] = (dout[n, o] @ w[o, i]) * gelu'(pre), as LinearBackward's din GEMM.
    cuda::LtGemm::Problem p =
        RowMajorLtProblem(false, false, n, in_dim, out_dim, 1.0f, dout16.bf16_bits(), out_dim,
                          AsBf16(ConstOperand(w), static_cast<size_t>(out_dim) * in_dim, 6), in_dim,
                          0.0f, dpre, in_dim);
    p.activation = cuda::LtGemm::Problem::Activation::kGeluBackward;
    p.aux = const_cast<void*>(pre.data);
    p.aux_ld = in_dim;
    if (lt_->Run(p)) return;
  }
  LinearBackward(dpre, nullptr, nullptr, dout16, act, w, n, in_dim, out_dim, false);
  GeluBackward(dpre, dpre, pre, static_cast<size_t>(n) * in_dim);
}

// ---- norms, activations, RoPE -------------------------------------------------------------------

void CudaBackend::LayerNormForward(Operand out, float* mean, float* rstd, const float* x,
                                   const float* g, const float* b, int n, int c, float eps) {
  CUDA_CHECK(cuda::LayerNormForward(ToElems(out), mean, rstd, x, g, b, n, c, eps, stream_));
}
void CudaBackend::LayerNormBackward(float* dx, const float* dres, float* dg, float* db,
                                    const float* dout, const float* x, const float* g,
                                    const float* mean, const float* rstd, int n, int c) {
  CUDA_CHECK(cuda::LayerNormBackward(dx, dres, dg, db, dout, x, g, mean, rstd, n, c,
                                     NormScratch(n, c, 2), stream_));
}
void CudaBackend::RmsNormForward(Operand out, float* rstd, const float* x, const float* g, int n,
                                 int c, float eps) {
  CUDA_CHECK(cuda::RmsNormForward(ToElems(out), rstd, x, g, n, c, eps, stream_));
}
void CudaBackend::RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                                  const float* x, const float* g, const float* rstd, int n, int c) {
  CUDA_CHECK(
      cuda::RmsNormBackward(dx, dres, dg, dout, x, g, rstd, n, c, NormScratch(n, c, 1), stream_));
}
void CudaBackend::GeluForward(Operand out, ConstOperand x, size_t n) {
  CUDA_CHECK(cuda::GeluForward(ToElems(out), ToElems(x), n, stream_));
}
void CudaBackend::GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) {
  CUDA_CHECK(cuda::GeluBackward(ToElems(dx), ToElems(dout), ToElems(x), n, stream_));
}
void CudaBackend::SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows, int cols,
                                int stride) {
  CheckSwiGluShape(rows, cols, stride);
  CUDA_CHECK(
      cuda::SwiGluForward(ToElems(out), ToElems(gate), ToElems(up), rows, cols, stride, stream_));
}
void CudaBackend::SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout, ConstOperand gate,
                                 ConstOperand up, int rows, int cols, int stride) {
  CheckSwiGluShape(rows, cols, stride);
  CUDA_CHECK(cuda::SwiGluBackward(ToElems(dgate), ToElems(dup), ToElems(dout), ToElems(gate),
                                  ToElems(up), rows, cols, stride, stream_));
}
void CudaBackend::DropoutAdd(float* out, const float* x, const float* branch, int n, int c, float p,
                             uint64_t key, int64_t row0) {
  MarkWritten(out, static_cast<size_t>(n) * c * sizeof(float));
  CUDA_CHECK(cuda::DropoutAdd(out, x, branch, n, c, p, key, row0, stream_));
}
void CudaBackend::DropoutBackward(float* dbranch, const float* dout, int n, int c, float p,
                                  uint64_t key, int64_t row0) {
  MarkWritten(dbranch, static_cast<size_t>(n) * c * sizeof(float));
  CUDA_CHECK(cuda::DropoutAdd(dbranch, nullptr, dout, n, c, p, key, row0, stream_));
}
void CudaBackend::RopeForward(Operand x, const int32_t* pos, int n, int heads, int head_dim,
                              int stride, const RopeParams& rope) {
  CheckRopeShape(heads, head_dim, stride);
  CUDA_CHECK(cuda::Rope(ToElems(x), pos, n, heads, head_dim, stride, rope, 1.0,
                        RopeTable(n, head_dim), stream_));
}
void CudaBackend::RopeBackward(Operand dx, const int32_t* pos, int n, int heads, int head_dim,
                               int stride, const RopeParams& rope) {
  CheckRopeShape(heads, head_dim, stride);
  CUDA_CHECK(cuda::Rope(ToElems(dx), pos, n, heads, head_dim, stride, rope, -1.0,
                        RopeTable(n, head_dim), stream_));
}

// ---- cross-entropy, optimizer -------------------------------------------------------------------

namespace {
// Logit gradients may overwrite the logits only element for element (same dtype, same address):
// a gradient of another dtype overlapping the logits would be written while other threads read
// them.
void CheckLogitGradientPlacement(ConstOperand dlogits, ConstOperand logits, size_t count) {
  if (dlogits.data == nullptr) return;
  const auto* d = static_cast<const char*>(dlogits.data);
  const auto* l = static_cast<const char*>(logits.data);
  if (d == l && dlogits.dtype == logits.dtype) return;
  EE_CHECK(d + count * DTypeSize(dlogits.dtype) <= l || l + count * DTypeSize(logits.dtype) <= d,
           "logit gradients (", DTypeName(dlogits.dtype), ") overlap the logits (",
           DTypeName(logits.dtype), ") other than element for element");
}
}  // namespace

void CudaBackend::CrossEntropy(float* losses, float* max_prob, Operand dlogits, ConstOperand logits,
                               const int32_t* targets, const float* weights, bool by_confidence,
                               int n, int v) {
  CheckLogitGradientPlacement(dlogits, logits, static_cast<size_t>(n) * v);
  CUDA_CHECK(cuda::CrossEntropy(losses, max_prob, ToElems(dlogits), ToElems(logits), targets,
                                weights, by_confidence, n, v, sm_count_, stream_));
}
void CudaBackend::RowMax(float* row_max, ConstOperand logits, int n, int v) {
  CUDA_CHECK(cuda::RowMax(row_max, ToElems(logits), n, v, stream_));
}
void CudaBackend::SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                                  const float* row_max, const int32_t* targets, int n, int v,
                                  int start) {
  CUDA_CHECK(cuda::SumExpAndTarget(sum_exp, target_logit, ToElems(logits), row_max, targets, n, v,
                                   start, stream_));
}
void CudaBackend::CrossEntropyFromStats(float* losses, float* max_prob, const float* row_max,
                                        const float* sum_exp, const float* target_logit, int n) {
  CUDA_CHECK(
      cuda::CrossEntropyFromStats(losses, max_prob, row_max, sum_exp, target_logit, n, stream_));
}
void CudaBackend::CrossEntropyGradRange(Operand dlogits, ConstOperand logits, const float* row_max,
                                        const float* sum_exp, const int32_t* targets,
                                        const float* weights, bool by_confidence, int n, int v,
                                        int start) {
  CheckLogitGradientPlacement(dlogits, logits, static_cast<size_t>(n) * v);
  CUDA_CHECK(cuda::CrossEntropyGradRange(ToElems(dlogits), ToElems(logits), row_max, sum_exp,
                                         targets, weights, by_confidence, n, v, start, stream_));
}

void CudaBackend::AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr,
                        float beta1, float beta2, float eps, float weight_decay, int step) {
  MarkWritten(p, n * sizeof(float));
  CUDA_CHECK(cuda::AdamW(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay,
                         AdamWInverseBiasCorrection(beta1, step),
                         AdamWInverseBiasCorrection(beta2, step), stream_));
}

void CudaBackend::AdamWRuns(float* p, const float* g, float* m, float* v,
                            const std::vector<AdamWRun>& runs, float lr, float beta1, float beta2,
                            float eps, float weight_decay, int step) {
  if (runs.empty()) return;
  size_t total = 0;
  for (const AdamWRun& r : runs) {
    total += r.count;
    MarkWritten(p + r.offset, r.count * sizeof(float));
  }
  const cuda::AdamWRunEntry* table = adamw_tables_.Get(
      runs,
      [](const std::vector<AdamWRun>& rs) {
        std::vector<cuda::AdamWRunEntry> entries(rs.size());
        for (size_t r = 0, first = 0; r < rs.size(); first += rs[r].count, ++r) {
          entries[r] = {first, rs[r].offset, rs[r].decay};
        }
        return entries;
      },
      stream_);
  CUDA_CHECK(cuda::AdamWRuns(p, g, m, v, table, static_cast<int>(runs.size()), total, lr, beta1,
                             beta2, eps, weight_decay, AdamWInverseBiasCorrection(beta1, step),
                             AdamWInverseBiasCorrection(beta2, step), stream_));
}

}  // namespace eellm
