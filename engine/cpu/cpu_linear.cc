// CpuBackend linear layer: GEMMs through OpenBLAS cblas_sgemm, bias add and bias gradient.
#include <cblas.h>

#include <algorithm>
#include <cstdint>

#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

constexpr int kColBlock = 128;

// out[n, o] += bias[o].
void AddBias(float* out, const float* bias, int n, int out_dim) {
  const bool parallel = static_cast<int64_t>(n) * out_dim >= (int64_t{1} << 15);
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < n; ++r) {
    float* row = out + static_cast<size_t>(r) * out_dim;
    for (int j = 0; j < out_dim; ++j) row[j] += bias[j];
  }
}

// dbias[o] += sum_r dout[r, o]. Threads own column blocks and sum rows in order
// (deterministic).
void BiasGrad(float* dbias, const float* dout, int n, int out_dim) {
  const int blocks = (out_dim + kColBlock - 1) / kColBlock;
  const bool parallel = static_cast<int64_t>(n) * out_dim >= (int64_t{1} << 15);
#pragma omp parallel for schedule(static) if (parallel)
  for (int cb = 0; cb < blocks; ++cb) {
    const int j0 = cb * kColBlock;
    const int j1 = std::min(out_dim, j0 + kColBlock);
    double acc[kColBlock] = {};
    for (int r = 0; r < n; ++r) {
      const float* row = dout + static_cast<size_t>(r) * out_dim;
      for (int j = j0; j < j1; ++j) acc[j - j0] += row[j];
    }
    for (int j = j0; j < j1; ++j) dbias[j] += static_cast<float>(acc[j - j0]);
  }
}

}  // namespace

void CpuBackend::Linear(Operand out_op, ConstOperand in_op, const float* w, const float* bias,
                        int n, int in_dim, int out_dim, bool accumulate) {
  float* out = out_op.f32();
  const float* in = in_op.f32();
  if (n <= 0 || out_dim <= 0) return;
  if (in_dim <= 0) {
    if (!accumulate) Fill(out, static_cast<size_t>(n) * out_dim, 0.0f);
  } else {
    // out[n, o] = in[n, i] @ w[o, i]^T (+ out).
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out_dim, in_dim, 1.0f, in, in_dim, w,
                in_dim, accumulate ? 1.0f : 0.0f, out, out_dim);
  }
  if (bias != nullptr) AddBias(out, bias, n, out_dim);
}

void CpuBackend::LinearBackward(Operand din_op, float* dw, float* dbias, ConstOperand dout_op,
                                ConstOperand in_op, const float* w, int n, int in_dim, int out_dim,
                                bool accumulate_din) {
  float* din = din_op.f32();
  const float* dout = dout_op.f32();
  const float* in = in_op.f32();
  if (n <= 0) return;
  if (din != nullptr && in_dim > 0) {
    if (out_dim <= 0) {
      if (!accumulate_din) Fill(din, static_cast<size_t>(n) * in_dim, 0.0f);
    } else {
      // din[n, i] = dout[n, o] @ w[o, i] (+ din).
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in_dim, out_dim, 1.0f, dout,
                  out_dim, w, in_dim, accumulate_din ? 1.0f : 0.0f, din, in_dim);
    }
  }
  if (out_dim <= 0) return;
  if (dw != nullptr && in_dim > 0) {
    // dw[o, i] += dout[n, o]^T @ in[n, i].
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, n, 1.0f, dout, out_dim,
                in, in_dim, 1.0f, dw, in_dim);
  }
  if (dbias != nullptr) BiasGrad(dbias, dout, n, out_dim);
}

}  // namespace eellm
