// CpuBackend causal self-attention with grouped-query heads (see engine/backend.h for the
// contract). Each (sequence, head) pair is one task: scores S = scale * Q K^T and outputs
// O = P V are OpenBLAS GEMMs on strided views of the [tokens, heads, d] layouts (no copies),
// over blocks of kQueryBlock query rows, each block's products stopping at the keys its last row
// sees (the masked upper triangle is mostly skipped: 62% of the full products at 4 blocks); the
// causal softmax runs row by row. Only the log-sum-exp of each query row is kept for the
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
#include "engine/cpu/cpu_exp.h"

namespace eellm {
namespace {

constexpr int kQueryBlock = 64;

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
    cpu::Exp(row, row, n_keys, 1.0f, mx);
    float sum = 0.0f;
    for (int j = 0; j < n_keys; ++j) sum += row[j];
    const float inv = 1.0f / sum;
    for (int j = 0; j < n_keys; ++j) row[j] *= inv;
    for (int j = n_keys; j < tk; ++j) row[j] = 0.0f;
    if (lse) lse[i] = mx + std::log(sum);
  }
}

// In place on s[rows, keys] holding scale * Q K^T for queries row0 .. row0 + rows - 1: row i
// becomes exp(s - lse[i]) over keys 0 .. row0 + i (the probabilities of the forward pass), zero
// after.
void ProbsFromLse(float* s, const float* lse, int rows, int keys, int row0) {
  for (int i = 0; i < rows; ++i) {
    float* row = s + static_cast<size_t>(i) * keys;
    cpu::Exp(row, row, row0 + i + 1, 1.0f, lse[i]);
    for (int j = row0 + i + 1; j < keys; ++j) row[j] = 0.0f;
  }
}

}  // namespace

void CpuBackend::AttentionForward(Operand out_op, float* lse, ConstOperand q_op, ConstOperand k_op,
                                  ConstOperand v_op, int b, int tq, int tk, int tk_cap, int hq,
                                  int hkv, int d, int q_offset, int q_stride, int kv_stride) {
  float* out = out_op.f32();
  const float *q = q_op.f32(), *k = k_op.f32(), *v = v_op.f32();
  CheckAttentionSizes(tq, tk, tk_cap, hq, hkv, q_offset);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int tasks = b * hq;
  const bool parallel = static_cast<int64_t>(tasks) * tq * tk * d >= (int64_t{1} << 18);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < tasks; ++task) {
    const int bi = task / hq, h = task % hq, kvh = h / group;
    const float* qh = q + static_cast<size_t>(bi) * tq * q_stride + static_cast<size_t>(h) * d;
    const size_t kv_at =
        static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * d;
    const float* kh = k + kv_at;
    const float* vh = v + kv_at;
    float* oh = out + (static_cast<size_t>(bi) * tq * hq + h) * d;  // rows stride hq*d
    float* s = Scratch(static_cast<size_t>(std::min(tq, kQueryBlock)) * tk, 0);
    for (int i0 = 0; i0 < tq; i0 += kQueryBlock) {
      const int rows = std::min(kQueryBlock, tq - i0);
      const int keys = std::min(tk, q_offset + i0 + rows);  // what the block's last row sees
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, d, scale,
                  qh + static_cast<size_t>(i0) * q_stride, q_stride, kh, kv_stride, 0.0f, s, keys);
      CausalSoftmaxRows(s, lse ? lse + static_cast<size_t>(task) * tq + i0 : nullptr, rows, keys,
                        q_offset + i0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, keys, 1.0f, s, keys, vh,
                  kv_stride, 0.0f, oh + static_cast<size_t>(i0) * hq * d, hq * d);
    }
  }
}

void CpuBackend::PagedAttentionForward(Operand out_op, ConstOperand q_op, ConstOperand k_op,
                                       ConstOperand v_op, const KvPageTable& pages, int tq, int hq,
                                       int hkv, int d, int q_offset, int q_stride) {
  float* out = out_op.f32();
  const float *q = q_op.f32(), *k = k_op.f32(), *v = v_op.f32();
  const int tk = q_offset + tq;
  CheckAttentionSizes(tq, tk, tk, hq, hkv, q_offset);
  CheckAttentionStrides(hq, hkv, d, q_stride, hkv * d);
  // The keys as runs of adjacent pool rows: each product runs per run (most sequences' pages
  // are handed out in order, so a run is usually many pages long).
  const std::vector<PageRun> runs = PageRuns(pages, 0, tk);
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const size_t ldk = static_cast<size_t>(hkv) * d;
  const bool parallel = static_cast<int64_t>(hq) * tq * tk * d >= (int64_t{1} << 18);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int h = 0; h < hq; ++h) {
    const size_t kv_head = static_cast<size_t>(h / group) * d;
    const float* qh = q + static_cast<size_t>(h) * d;  // rows stride q_stride
    float* oh = out + static_cast<size_t>(h) * d;      // rows stride hq*d
    float* s = Scratch(static_cast<size_t>(std::min(tq, kQueryBlock)) * tk, 0);
    for (int i0 = 0; i0 < tq; i0 += kQueryBlock) {
      const int rows = std::min(kQueryBlock, tq - i0);
      const int keys = q_offset + i0 + rows;  // what the block's last row sees
      const size_t at = static_cast<size_t>(i0) * hq * d;
      for (const PageRun& r : runs) {
        if (r.pos >= keys) break;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, std::min(r.count, keys - r.pos),
                    d, scale, qh + static_cast<size_t>(i0) * q_stride, q_stride,
                    k + r.row * ldk + kv_head, hkv * d, 0.0f, s + r.pos, keys);
      }
      CausalSoftmaxRows(s, nullptr, rows, keys, q_offset + i0);
      for (const PageRun& r : runs) {
        if (r.pos >= keys) break;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d,
                    std::min(r.count, keys - r.pos), 1.0f, s + r.pos, keys,
                    v + r.row * ldk + kv_head, hkv * d, r.pos == 0 ? 0.0f : 1.0f, oh + at, hq * d);
      }
    }
  }
}

void CpuBackend::AttentionBackward(Operand dq_op, Operand dk_op, Operand dv_op,
                                   ConstOperand dout_op, ConstOperand out_op, const float* lse,
                                   ConstOperand q_op, ConstOperand k_op, ConstOperand v_op, int b,
                                   int t, int hq, int hkv, int d, int q_stride, int kv_stride) {
  float *dq = dq_op.f32(), *dk = dk_op.f32(), *dv = dv_op.f32();
  const float* dout = dout_op.f32();
  const float* out = out_op.f32();
  const float *q = q_op.f32(), *k = k_op.f32(), *v = v_op.f32();
  CheckAttentionSizes(t, t, t, hq, hkv, 0);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
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
    // k, v, dk and dv share the layout (rows kv_stride apart), as q and dq do.
    const size_t kv_off = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * d;
    const float* kh = k + kv_off;
    const float* vh = v + kv_off;
    float* dkh = dk + kv_off;
    float* dvh = dv + kv_off;
    for (int j = 0; j < t; ++j) {
      std::memset(dkh + static_cast<size_t>(j) * kv_stride, 0, sizeof(float) * d);
      std::memset(dvh + static_cast<size_t>(j) * kv_stride, 0, sizeof(float) * d);
    }
    const size_t block = static_cast<size_t>(std::min(t, kQueryBlock)) * t;
    float* p = Scratch(block, 0);
    float* ds = Scratch(block, 1);
    // Heads in order, query blocks in order: dK and dV add up in a fixed order.
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
      const float* lse_h = lse + (static_cast<size_t>(bi) * hq + h) * t;
      for (int i0 = 0; i0 < t; i0 += kQueryBlock) {
        const int rows = std::min(kQueryBlock, t - i0), keys = i0 + rows;
        const size_t q_at =  // q and dq
            (static_cast<size_t>(bi) * t + i0) * q_stride + static_cast<size_t>(h) * d;
        const size_t o_at = ((static_cast<size_t>(bi) * t + i0) * hq + h) * d;  // dout
        const float *qb = q + q_at, *dob = dout + o_at;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, d, scale, qb, q_stride, kh,
                    kv_stride, 0.0f, p, keys);
        ProbsFromLse(p, lse_h + i0, rows, keys, i0);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, d, rows, 1.0f, p, keys, dob,
                    hq * d, 1.0f, dvh, kv_stride);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, d, 1.0f, dob, hq * d, vh,
                    kv_stride, 0.0f, ds, keys);
        for (int i = 0; i < rows; ++i) {
          float* row = ds + static_cast<size_t>(i) * keys;
          const float* prow = p + static_cast<size_t>(i) * keys;
          const int last = i0 + i;
          float dot = 0.0f;
          for (int j = 0; j <= last; ++j) dot += prow[j] * row[j];
          for (int j = 0; j <= last; ++j) row[j] = prow[j] * (row[j] - dot);
          for (int j = last + 1; j < keys; ++j) row[j] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, keys, scale, ds, keys, kh,
                    kv_stride, 0.0f, dq + q_at, q_stride);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, d, rows, scale, ds, keys, qb,
                    q_stride, 1.0f, dkh, kv_stride);
      }
    }
  }
}

}  // namespace eellm
