// CpuBackend memory, elementwise, reduction and embedding ops.
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/core/status.h"
#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

// Below this many elements an elementwise loop runs on one thread (fork/join costs more).
constexpr size_t kParallelMin = size_t{1} << 15;
// SumSquares reduces fixed-size blocks, then adds the block sums in order, so the result does
// not depend on the number of threads.
constexpr size_t kReduceBlock = size_t{1} << 14;
constexpr size_t kAlignment = 64;

}  // namespace

void* CpuBackend::Alloc(size_t bytes) {
  // std::aligned_alloc needs a size that is a multiple of the alignment.
  size_t rounded = std::max<size_t>(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
  void* p = std::aligned_alloc(kAlignment, rounded);
  EE_CHECK(p != nullptr, "CpuBackend::Alloc failed for ", bytes, " bytes");
  return p;
}

void CpuBackend::Free(void* p) { std::free(p); }

void CpuBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(host_dst, src, bytes);
}

void CpuBackend::CopyFromHost(void* dst, const void* host_src, size_t bytes) {
  if (bytes) std::memmove(dst, host_src, bytes);
}

void CpuBackend::Copy(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
}

void CpuBackend::Fill(float* x, size_t n, float value) {
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for simd if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) x[i] = value;
}

void CpuBackend::Add(float* y, const float* a, const float* b, size_t n) {
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for simd if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) y[i] = a[i] + b[i];
}

void CpuBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for simd if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) y[i] += alpha * x[i];
}

void CpuBackend::Scale(Operand x_op, float alpha, size_t n) {
  float* x = x_op.f32();  // this backend's operands are fp32
  const ptrdiff_t nn = static_cast<ptrdiff_t>(n);
#pragma omp parallel for simd if (n >= kParallelMin)
  for (ptrdiff_t i = 0; i < nn; ++i) x[i] *= alpha;
}

void CpuBackend::ToFloat(float* out, ConstOperand in, size_t n) {
  EE_CHECK(in.dtype == DType::kF32, "the CPU backend holds fp32 operands only");
  if (n && out != in.f32()) std::memmove(out, in.f32(), n * sizeof(float));
}

double CpuBackend::SumSquares(const float* x, size_t n) {
  const ptrdiff_t blocks = static_cast<ptrdiff_t>((n + kReduceBlock - 1) / kReduceBlock);
  if (blocks <= 1) {
    double s = 0.0;
    for (size_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
    return s;
  }
  // One partial per block (host scratch; this is a reduction result, not a device tensor).
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static)
  for (ptrdiff_t blk = 0; blk < blocks; ++blk) {
    const size_t begin = static_cast<size_t>(blk) * kReduceBlock;
    const size_t end = std::min(n, begin + kReduceBlock);
    double s = 0.0;
    for (size_t i = begin; i < end; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[static_cast<size_t>(blk)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

void CpuBackend::EmbeddingForward(float* out, const int32_t* ids, const float* table, int n,
                                  int c) {
  EmbeddingForwardRange(out, ids, table, n, c, 0, std::numeric_limits<int>::max());
}

void CpuBackend::EmbeddingAdd(float* out, const int32_t* ids, const float* table, int n, int c) {
  const bool parallel = static_cast<size_t>(n) * c >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int t = 0; t < n; ++t) {
    float* dst = out + static_cast<size_t>(t) * c;
    const float* src = table + static_cast<size_t>(ids[t]) * c;
    for (int j = 0; j < c; ++j) dst[j] += src[j];
  }
}

void CpuBackend::EmbeddingBackward(float* dtable, const int32_t* ids, const float* dout, int n,
                                   int c) {
  EmbeddingBackwardRange(dtable, ids, dout, n, c, 0, std::numeric_limits<int>::max());
}

void CpuBackend::EmbeddingForwardRange(float* out, const int32_t* ids, const float* table, int n,
                                       int c, int start, int rows) {
  const bool parallel = static_cast<size_t>(n) * c >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int t = 0; t < n; ++t) {
    float* dst = out + static_cast<size_t>(t) * c;
    const int64_t row = static_cast<int64_t>(ids[t]) - start;
    if (row >= 0 && row < rows) {
      std::memcpy(dst, table + static_cast<size_t>(row) * c,
                  sizeof(float) * static_cast<size_t>(c));
    } else {
      std::memset(dst, 0, sizeof(float) * static_cast<size_t>(c));
    }
  }
}

void CpuBackend::EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n,
                                        int c, int start, int rows) {
  // Deterministic: each thread owns a slice of columns and walks the tokens in order, so rows
  // hit by several tokens always accumulate in token order.
  constexpr int kColBlock = 64;
  const int col_blocks = (c + kColBlock - 1) / kColBlock;
  const bool parallel = static_cast<size_t>(n) * c >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int cb = 0; cb < col_blocks; ++cb) {
    const int j0 = cb * kColBlock;
    const int j1 = std::min(c, j0 + kColBlock);
    for (int t = 0; t < n; ++t) {
      const int64_t row = static_cast<int64_t>(ids[t]) - start;
      if (row < 0 || row >= rows) continue;
      float* dst = dtable + static_cast<size_t>(row) * c;
      const float* src = dout + static_cast<size_t>(t) * c;
      for (int j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace eellm
