// CpuBackend causal self-attention with grouped-query heads (see engine/backend.h for the
// contract). Every query row is computed independently and with the same code whether or not
// probabilities are saved, so the KV-cache decode path reproduces the training path's rows.
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
float* Scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Dot product with four fixed partial sums (vectorisable, deterministic).
inline float Dot(const float* a, const float* b, int d) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < d; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

// y[0:d] += alpha * x[0:d].
inline void AxpyRow(float* __restrict y, float alpha, const float* __restrict x, int d) {
#pragma omp simd
  for (int j = 0; j < d; ++j) y[j] += alpha * x[j];
}

}  // namespace

void CpuBackend::AttentionForward(float* out, float* probs, const float* q, const float* k,
                                  const float* v, int b, int tq, int tk, int tk_cap, int hq,
                                  int hkv, int d, int q_offset) {
  EE_CHECK(hkv > 0 && hq % hkv == 0, "hq=", hq, " is not a multiple of hkv=", hkv);
  EE_CHECK(tk <= tk_cap && q_offset >= 0 && q_offset + tq <= tk, "bad attention sizes tq=", tq,
           " tk=", tk, " tk_cap=", tk_cap, " q_offset=", q_offset);
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t rows = static_cast<int64_t>(b) * hq * tq;
  const bool parallel = rows * tk * d >= 16384;
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
  for (int64_t idx = 0; idx < rows; ++idx) {  // idx = (bi * hq + h) * tq + i
    const int i = static_cast<int>(idx % tq);
    const int h = static_cast<int>((idx / tq) % hq);
    const int bi = static_cast<int>(idx / (static_cast<int64_t>(tq) * hq));
    const int kvh = h / group;
    const size_t qo = ((static_cast<size_t>(bi) * tq + i) * hq + h) * d;
    const float* qr = q + qo;
    float* orow = out + qo;
    const int n_keys = q_offset + i + 1;  // keys 0 .. q_offset + i
    float* s = probs != nullptr ? probs + static_cast<size_t>(idx) * tk : Scratch(n_keys);
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; ++j) {
      const float* kr = k + ((static_cast<size_t>(bi) * tk_cap + j) * hkv + kvh) * d;
      s[j] = Dot(qr, kr, d) * scale;
      mx = std::max(mx, s[j]);
    }
    double sum = 0.0;
    for (int j = 0; j < n_keys; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    const float inv = static_cast<float>(1.0 / sum);
    std::memset(orow, 0, sizeof(float) * d);
    for (int j = 0; j < n_keys; ++j) {
      s[j] *= inv;
      const float* vr = v + ((static_cast<size_t>(bi) * tk_cap + j) * hkv + kvh) * d;
      AxpyRow(orow, s[j], vr, d);
    }
    if (probs != nullptr) {
      for (int j = n_keys; j < tk; ++j) s[j] = 0.0f;
    }
  }
}

void CpuBackend::AttentionBackward(float* dq, float* dk, float* dv, const float* dout,
                                   const float* probs, const float* q, const float* k,
                                   const float* v, int b, int t, int hq, int hkv, int d) {
  EE_CHECK(hkv > 0 && hq % hkv == 0, "hq=", hq, " is not a multiple of hkv=", hkv);
  // With p = softmax(s), dp_ij = dout_i . v_j and D_i = sum_j p_ij dp_ij:
  //   ds_ij = p_ij (dp_ij - D_i); dq_i = scale sum_j ds_ij k_j;
  //   dk_j = scale sum_i ds_ij q_i; dv_j = sum_i p_ij dout_i (summed over the group's heads).
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t rows = static_cast<int64_t>(b) * hq * t;
  std::vector<float> row_dot(static_cast<size_t>(rows));  // D_i per (bi, h, i)
  const bool parallel = rows * t * d >= 16384;

  // Phase 1: one task per query row writes dq_i and D_i.
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
  for (int64_t idx = 0; idx < rows; ++idx) {  // idx = (bi * hq + h) * t + i
    const int i = static_cast<int>(idx % t);
    const int h = static_cast<int>((idx / t) % hq);
    const int bi = static_cast<int>(idx / (static_cast<int64_t>(t) * hq));
    const int kvh = h / group;
    const size_t qo = ((static_cast<size_t>(bi) * t + i) * hq + h) * d;
    const float* dor = dout + qo;
    const float* p = probs + static_cast<size_t>(idx) * t;
    float* dp = Scratch(static_cast<size_t>(i) + 1);
    double dsum = 0.0;
    for (int j = 0; j <= i; ++j) {
      const float* vr = v + ((static_cast<size_t>(bi) * t + j) * hkv + kvh) * d;
      dp[j] = Dot(dor, vr, d);
      dsum += static_cast<double>(p[j]) * dp[j];
    }
    const float drow = static_cast<float>(dsum);
    row_dot[static_cast<size_t>(idx)] = drow;
    float* dqr = dq + qo;
    std::memset(dqr, 0, sizeof(float) * d);
    for (int j = 0; j <= i; ++j) {
      const float* kr = k + ((static_cast<size_t>(bi) * t + j) * hkv + kvh) * d;
      AxpyRow(dqr, p[j] * (dp[j] - drow) * scale, kr, d);
    }
  }

  // Phase 2: one task per key row (bi, j, kvh) writes dk_j and dv_j; no two tasks share an
  // output row, and each sums heads and queries in a fixed order.
  const int64_t kv_rows = static_cast<int64_t>(b) * t * hkv;
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
  for (int64_t kidx = 0; kidx < kv_rows; ++kidx) {  // kidx = (bi * t + j) * hkv + kvh
    const int kvh = static_cast<int>(kidx % hkv);
    const int j = static_cast<int>((kidx / hkv) % t);
    const int bi = static_cast<int>(kidx / (static_cast<int64_t>(hkv) * t));
    const size_t ko = static_cast<size_t>(kidx) * d;
    const float* vr = v + ko;
    float* dkr = dk + ko;
    float* dvr = dv + ko;
    std::memset(dkr, 0, sizeof(float) * d);
    std::memset(dvr, 0, sizeof(float) * d);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
      const size_t prow0 = (static_cast<size_t>(bi) * hq + h) * t;
      for (int i = j; i < t; ++i) {
        const float pij = probs[(prow0 + i) * t + j];
        if (pij == 0.0f) continue;
        const size_t qo = ((static_cast<size_t>(bi) * t + i) * hq + h) * d;
        const float* dor = dout + qo;
        AxpyRow(dvr, pij, dor, d);
        const float ds = pij * (Dot(dor, vr, d) - row_dot[prow0 + i]);
        AxpyRow(dkr, ds * scale, q + qo, d);
      }
    }
  }
}

}  // namespace eellm
