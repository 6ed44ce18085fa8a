// CpuBackend causal self-attention with grouped-query heads (see engine/backend.h for the
// contract). Each (sequence, head) pair is one task: scores S = scale * Q K^T and outputs
// O = P V are OpenBLAS GEMMs on strided views of the [tokens, heads, d] layouts (no copies);
// the causal softmax runs row by row. Only the log-sum-exp of each query row is kept for the
// backward, which recomputes the probabilities (as FlashAttention does): no [t, t] tensor
// outlives a call. Tasks run in parallel with OpenMP; inside a parallel
// region the OpenMP build of OpenBLAS runs single-threaded, so there is no oversubscription.
// The backward runs one task per (sequence, KV head) so that the heads sharing a KV head add
// their dK/dV contributions in a fixed order: results are deterministic.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/core/status.h"
#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

// Per-thread host scratch of at least n floats (grows, never shrinks).
float* Scratch(size_t n, int slot) {
  thread_local std::vector<float> buf[2];
  if (buf[slot].size() < n) buf[slot].resize(n);
  return buf[slot].data();
}

// In place on s[tq, tk]: row i becomes softmax over keys 0 .. q_offset + i, zero after;
// lse[i] (when non-null) gets the row's log-sum-exp of the scores.
void CausalSoftmaxRows(float* s, float* lse, int tq, int tk, int q_offset) {
  for (int i = 0; i < tq; ++i) {
    float* row = s + static_cast<size_t>(i) * tk;
    const int n_keys = q_offset + i + 1;
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
    for (int j = 0; j < n_keys; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j < n_keys; ++j) row[j] *= inv;
    for (int j = n_keys; j < tk; ++j) row[j] = 0.0f;
    if (lse) lse[i] = mx + std::log(sum);
  }
}

// In place on s[t, t] holding scale * Q K^T: row i becomes exp(s - lse[i]) over keys 0 .. i
// (the probabilities of the forward pass), zero after.
void ProbsFromLse(float* s, const float* lse, int t) {
  for (int i = 0; i < t; ++i) {
    float* row = s + static_cast<size_t>(i) * t;
    for (int j = 0; j <= i; ++j) row[j] = std::exp(row[j] - lse[i]);
    for (int j = i + 1; j < t; ++j) row[j] = 0.0f;
  }
}

}  // namespace

void CpuBackend::AttentionForward(Operand out_op, float* lse, ConstOperand q_op, ConstOperand k_op,
                                  ConstOperand v_op, int b, int tq, int tk, int tk_cap, int hq,
                                  int hkv, int d, int q_offset) {
  float* out = out_op.f32();
  const float *q = q_op.f32(), *k = k_op.f32(), *v = v_op.f32();
  CheckAttentionSizes(tq, tk, tk_cap, hq, hkv, q_offset);
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int tasks = b * hq;
  const bool parallel = static_cast<int64_t>(tasks) * tq * tk * d >= (int64_t{1} << 18);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < tasks; ++task) {
    const int bi = task / hq, h = task % hq, kvh = h / group;
    const float* qh = q + (static_cast<size_t>(bi) * tq * hq + h) * d;  // rows stride hq*d
    const float* kh = k + (static_cast<size_t>(bi) * tk_cap * hkv + kvh) * d;
    const float* vh = v + (static_cast<size_t>(bi) * tk_cap * hkv + kvh) * d;
    float* oh = out + (static_cast<size_t>(bi) * tq * hq + h) * d;
    float* s = Scratch(static_cast<size_t>(tq) * tk, 0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tq, tk, d, scale, qh, hq * d, kh, hkv * d,
                0.0f, s, tk);
    CausalSoftmaxRows(s, lse ? lse + static_cast<size_t>(task) * tq : nullptr, tq, tk, q_offset);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tq, d, tk, 1.0f, s, tk, vh, hkv * d,
                0.0f, oh, hq * d);
  }
}

void CpuBackend::AttentionBackward(Operand dq_op, Operand dk_op, Operand dv_op,
                                   ConstOperand dout_op, ConstOperand out_op, const float* lse,
                                   ConstOperand q_op, ConstOperand k_op, ConstOperand v_op, int b,
                                   int t, int hq, int hkv, int d) {
  float *dq = dq_op.f32(), *dk = dk_op.f32(), *dv = dv_op.f32();
  const float* dout = dout_op.f32();
  const float* out = out_op.f32();
  const float *q = q_op.f32(), *k = k_op.f32(), *v = v_op.f32();
  CheckAttentionSizes(t, t, t, hq, hkv, 0);
  // The probabilities are recomputed: P = exp(scale Q K^T - lse). Then dV = P^T dO;
  // dP = dO V^T; dS = P * (dP - rowsum(P * dP)) (rowsum(P * dP) equals dO_i . O_i, which fused
  // kernels use; `out` is in the contract for them);
  // dQ = scale dS K; dK = scale dS^T Q (dK, dV summed over the heads sharing the KV head).
  (void)out;
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int tasks = b * hkv;
  const bool parallel = static_cast<int64_t>(tasks) * group * t * t * d >= (int64_t{1} << 18);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < tasks; ++task) {
    const int bi = task / hkv, kvh = task % hkv;
    const size_t kv_off = (static_cast<size_t>(bi) * t * hkv + kvh) * d;
    const float* kh = k + kv_off;
    const float* vh = v + kv_off;
    float* dkh = dk + kv_off;
    float* dvh = dv + kv_off;
    for (int j = 0; j < t; ++j) {
      std::memset(dkh + static_cast<size_t>(j) * hkv * d, 0, sizeof(float) * d);
      std::memset(dvh + static_cast<size_t>(j) * hkv * d, 0, sizeof(float) * d);
    }
    float* p = Scratch(static_cast<size_t>(t) * t, 0);
    float* ds = Scratch(static_cast<size_t>(t) * t, 1);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
      const size_t q_off = (static_cast<size_t>(bi) * t * hq + h) * d;
      const float* doh = dout + q_off;
      const float* lse_h = lse + (static_cast<size_t>(bi) * hq + h) * t;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, d, scale, q + q_off, hq * d, kh,
                  hkv * d, 0.0f, p, t);
      ProbsFromLse(p, lse_h, t);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, 1.0f, p, t, doh, hq * d, 1.0f,
                  dvh, hkv * d);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, d, 1.0f, doh, hq * d, vh, hkv * d,
                  0.0f, ds, t);
      for (int i = 0; i < t; ++i) {
        float* row = ds + static_cast<size_t>(i) * t;
        const float* prow = p + static_cast<size_t>(i) * t;
        float dot = 0.0f;
        for (int j = 0; j <= i; ++j) dot += prow[j] * row[j];
        for (int j = 0; j <= i; ++j) row[j] = prow[j] * (row[j] - dot);
        for (int j = i + 1; j < t; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, d, t, scale, ds, t, kh, hkv * d,
                  0.0f, dq + q_off, hq * d);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, scale, ds, t, q + q_off, hq * d,
                  1.0f, dkh, hkv * d);
    }
  }
}

}  // namespace eellm
