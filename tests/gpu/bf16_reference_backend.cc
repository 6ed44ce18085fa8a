// Bf16ReferenceBackend: converts operands, runs the CPU op, rounds the outputs (see the header).
#include "tests/gpu/bf16_reference_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "engine/core/status.h"
#include "tests/gpu/cudnn_graph_reference.h"

namespace eellm::testing {
namespace {

float RoundToBf16(float x) { return Bf16ToFloat(FloatToBf16(x)); }

// The fused forward's key tile and the slack before its reference maximum rises
// (engine/cuda/flash_attention.cu: kFwdKeys, kRescaleSlack).
constexpr int kFusedTile = 32;
constexpr float kFusedSlack = 8.0f;

// Writes src into dst in dst's dtype (bf16: rounded once).
void Store(Operand dst, const std::vector<float>& src) {
  if (!dst.is_bf16()) {
    std::memcpy(dst.f32(), src.data(), src.size() * sizeof(float));
    return;
  }
  uint16_t* bits = dst.bf16_bits();
  for (size_t i = 0; i < src.size(); ++i) bits[i] = FloatToBf16(src[i]).bits;
}

// Writes src ([rows, cols]) into rows `stride` apart of dst, leaving the elements between them.
void StoreRows(Operand dst, const std::vector<float>& src, int rows, int cols, int stride) {
  for (int r = 0; r < rows; ++r) {
    const size_t at = static_cast<size_t>(r) * cols;
    Store(dst.At(static_cast<size_t>(r) * stride),
          std::vector<float>(src.begin() + at, src.begin() + at + cols));
  }
}

// exp(s scale - m) as the fused kernels form it: 2^(s (scale log2 e) - m log2 e), one fused
// multiply-add in fp32 (exp2 then differs from the device's ex2.approx by its 2 ulp at most).
constexpr float kLog2e = 1.4426950408889634f;
float FusedExp(float s, float scale, float m) {
  return std::exp2(std::fma(s, scale * kLog2e, -(m * kLog2e)));
}
}  // namespace

std::vector<float> OperandValues(ConstOperand x, size_t n, bool round) {
  if (x.data == nullptr) return {};
  std::vector<float> r(n);
  if (x.is_bf16()) {
    const uint16_t* bits = x.bf16_bits();
    for (size_t i = 0; i < n; ++i) r[i] = Bf16ToFloat(bf16{bits[i]});
  } else {
    std::memcpy(r.data(), x.f32(), n * sizeof(float));
    if (round) {
      for (float& v : r) v = RoundToBf16(v);
    }
  }
  return r;
}

namespace {
// Rows of `cols` elements `stride` apart, gathered into a dense [rows, cols] array.
std::vector<float> RowValues(ConstOperand x, int rows, int cols, int stride) {
  std::vector<float> r;
  r.reserve(static_cast<size_t>(rows) * cols);
  for (int i = 0; i < rows; ++i) {
    const std::vector<float> row = OperandValues(x.At(static_cast<size_t>(i) * stride), cols);
    r.insert(r.end(), row.begin(), row.end());
  }
  return r;
}

// RoPE (`inverse`: its backward) by the CPU on the heads of x's rows, gathered dense and stored
// back in x's dtype.
void RopeRows(Backend* cpu, Operand x, const int32_t* pos, int n, int heads, int head_dim,
              int stride, const RopeParams& rope, bool inverse) {
  CheckRopeShape(heads, head_dim, stride);
  const int cols = heads * head_dim;
  std::vector<float> v = RowValues(x, n, cols, stride);
  if (inverse) {
    cpu->RopeBackward(v.data(), pos, n, heads, head_dim, cols, rope);
  } else {
    cpu->RopeForward(v.data(), pos, n, heads, head_dim, cols, rope);
  }
  StoreRows(x, v, n, cols, stride);
}
}  // namespace

Bf16ReferenceBackend::Bf16ReferenceBackend(std::unique_ptr<Backend> cpu,
                                           std::function<bool(int)> fused_attention,
                                           std::function<bool(int)> cudnn_graphs)
    : cpu_(std::move(cpu)),
      fused_attention_(std::move(fused_attention)),
      cudnn_graphs_(std::move(cudnn_graphs)) {
  EE_CHECK(cpu_->device() == Device::kCpu, "Bf16ReferenceBackend wraps a CPU backend");
}

void Bf16ReferenceBackend::Linear(Operand out, ConstOperand in, const float* w, const float* bias,
                                  int n, int in_dim, int out_dim, bool accumulate) {
  if (n <= 0 || out_dim <= 0) return;
  const size_t rows = static_cast<size_t>(n), count = rows * out_dim;
  const std::vector<float> x = OperandValues(in, rows * in_dim, true);
  const std::vector<float> wr = OperandValues(w, static_cast<size_t>(out_dim) * in_dim, true);
  std::vector<float> y = accumulate ? OperandValues(out, count) : std::vector<float>(count);
  cpu_->Linear(y.data(), x.data(), wr.data(), nullptr, n, in_dim, out_dim, accumulate);
  // The device's GEMM epilogue adds the bias, in the output's dtype, before the one rounding.
  if (bias != nullptr) {
    const std::vector<float> br = OperandValues(bias, out_dim, out.is_bf16());
    for (size_t i = 0; i < count; ++i) y[i] += br[i % out_dim];
  }
  Store(out, y);
}

void Bf16ReferenceBackend::LinearBackward(Operand din, float* dw, float* dbias, ConstOperand dout,
                                          ConstOperand in, const float* w, int n, int in_dim,
                                          int out_dim, bool accumulate_din) {
  if (n <= 0) return;
  EE_CHECK(!(accumulate_din && din.is_bf16()), "LinearBackward would accumulate din in bf16");
  const size_t rows = static_cast<size_t>(n);
  const size_t ins = in_dim > 0 ? in_dim : 0, outs = out_dim > 0 ? out_dim : 0;
  const size_t in_count = rows * ins, out_count = rows * outs;
  // The GEMMs read dout, in and w as bf16; the bias gradient sums dout as they read it.
  const std::vector<float> g = OperandValues(dout, out_count, true);
  const std::vector<float> x = OperandValues(in, in_count, true);
  const std::vector<float> wr = OperandValues(w, outs * ins, true);  // empty for a null w
  std::vector<float> dx;
  if (din.data != nullptr) {
    dx = accumulate_din ? OperandValues(din, in_count) : std::vector<float>(in_count);
  }
  cpu_->LinearBackward(din.data != nullptr ? dx.data() : nullptr, dw, nullptr, g.data(), x.data(),
                       wr.data(), n, in_dim, out_dim, accumulate_din);
  if (din.data != nullptr) Store(din, dx);
  if (dbias != nullptr) {
    cpu_->LinearBackward(Operand(), nullptr, dbias, g.data(), x.data(), wr.data(), n, in_dim,
                         out_dim, false);
  }
}

void Bf16ReferenceBackend::LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w,
                                      const float* bias, int n, int in_dim, int out_dim) {
  if (n <= 0 || out_dim <= 0) return;
  const size_t count = static_cast<size_t>(n) * out_dim;
  std::vector<float> y(count);
  Linear(Operand(y.data()), in, w, nullptr, n, in_dim, out_dim, false);  // fp32: not rounded
  if (bias != nullptr) {  // in pre's dtype, as the device's epilogue adds it
    const std::vector<float> br = OperandValues(bias, out_dim, pre.is_bf16());
    for (size_t i = 0; i < count; ++i) y[i] += br[i % out_dim];
  }
  Store(pre, y);
  std::vector<float> g(count);
  cpu_->GeluForward(g.data(), y.data(), count);
  Store(act, g);
}

void Bf16ReferenceBackend::LayerNormForward(Operand out, float* mean, float* rstd, const float* x,
                                            const float* g, const float* b, int n, int c,
                                            float eps) {
  std::vector<float> y(static_cast<size_t>(n) * c);
  cpu_->LayerNormForward(y.data(), mean, rstd, x, g, b, n, c, eps);
  Store(out, y);
}

void Bf16ReferenceBackend::RmsNormForward(Operand out, float* rstd, const float* x, const float* g,
                                          int n, int c, float eps) {
  std::vector<float> y(static_cast<size_t>(n) * c);
  cpu_->RmsNormForward(y.data(), rstd, x, g, n, c, eps);
  Store(out, y);
}

void Bf16ReferenceBackend::GeluForward(Operand out, ConstOperand x, size_t n) {
  const std::vector<float> xv = OperandValues(x, n);
  std::vector<float> y(n);
  cpu_->GeluForward(y.data(), xv.data(), n);
  Store(out, y);
}

void Bf16ReferenceBackend::GeluBackward(Operand dx, ConstOperand dout, ConstOperand x, size_t n) {
  const std::vector<float> g = OperandValues(dout, n), xv = OperandValues(x, n);
  std::vector<float> d(n);
  cpu_->GeluBackward(d.data(), g.data(), xv.data(), n);
  Store(dx, d);
}

void Bf16ReferenceBackend::SwiGluForward(Operand out, ConstOperand gate, ConstOperand up, int rows,
                                         int cols, int stride) {
  CheckSwiGluShape(rows, cols, stride);
  const size_t n = static_cast<size_t>(rows) * cols;
  const std::vector<float> a = RowValues(gate, rows, cols, stride),
                           u = RowValues(up, rows, cols, stride);
  std::vector<float> y(n);
  cpu_->SwiGluForward(y.data(), a.data(), u.data(), rows, cols, cols);
  Store(out, y);
}

void Bf16ReferenceBackend::SwiGluBackward(Operand dgate, Operand dup, ConstOperand dout,
                                          ConstOperand gate, ConstOperand up, int rows, int cols,
                                          int stride) {
  CheckSwiGluShape(rows, cols, stride);
  const size_t n = static_cast<size_t>(rows) * cols;
  const std::vector<float> g = OperandValues(dout, n), a = RowValues(gate, rows, cols, stride),
                           u = RowValues(up, rows, cols, stride);
  std::vector<float> da(n), du(n);
  cpu_->SwiGluBackward(da.data(), du.data(), g.data(), a.data(), u.data(), rows, cols, cols);
  StoreRows(dgate, da, rows, cols, stride);
  StoreRows(dup, du, rows, cols, stride);
}

void Bf16ReferenceBackend::ToFloat(float* out, ConstOperand in, size_t n) {
  const std::vector<float> v = OperandValues(in, n, false);
  std::copy(v.begin(), v.end(), out);
}

void Bf16ReferenceBackend::RopeForward(Operand x, const int32_t* pos, int n, int heads,
                                       int head_dim, int stride, const RopeParams& rope) {
  RopeRows(cpu_.get(), x, pos, n, heads, head_dim, stride, rope, false);
}

void Bf16ReferenceBackend::RopeBackward(Operand dx, const int32_t* pos, int n, int heads,
                                        int head_dim, int stride, const RopeParams& rope) {
  RopeRows(cpu_.get(), dx, pos, n, heads, head_dim, stride, rope, true);
}

// Attention on the stored bf16 values, with the device's roundings inside: the probabilities
// that multiply V and dS are rounded to bf16, everything else is fp32 (sums of the softmax in
// double on the per-head path, as its kernels do). The fused kernels (flash_attention.cu) take
// exp(s - row max), multiply it by V and normalise after the product by the rounded values' sum;
// the per-head path normalises first. In the backward both recompute P = exp(s - lse); the fused
// kernels take D_i = dO_i . O_i, the per-head path sum_j P_ij dP_ij. Where cuDNN's graphs run
// (cudnn_graphs_), the training path rounds as they do (cudnn_graph_reference.h).
void Bf16ReferenceBackend::AttentionForward(Operand out, float* lse, ConstOperand q, ConstOperand k,
                                            ConstOperand v, int b, int tq, int tk, int tk_cap,
                                            int hq, int hkv, int d, int q_offset, int q_stride,
                                            int kv_stride) {
  CheckAttentionSizes(tq, tk, tk_cap, hq, hkv, q_offset);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  const bool fused = fused_attention_(d);
  const size_t nq = static_cast<size_t>(b) * tq * hq * d;
  // q, k, v gathered dense.
  const std::vector<float> qv = RowValues(q, b * tq, hq * d, q_stride),
                           kv = RowValues(k, b * tk_cap, hkv * d, kv_stride),
                           vv = RowValues(v, b * tk_cap, hkv * d, kv_stride);
  std::vector<float> o(nq), p(tk), dots(tk), acc(d);
  // (As CudaBackend::AttentionForward offers cuDNN only the training path's calls.)
  if (cudnn_graphs_ && cudnn_graphs_(d) && lse != nullptr && q_offset == 0 && tq == tk &&
      tk == tk_cap && tq >= 2) {
    CudnnGraphAttentionForward(o.data(), lse, qv.data(), kv.data(), vv.data(), b, tq, hq, hkv, d);
    Store(out, o);
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int bi = 0; bi < b; ++bi) {
    for (int h = 0; h < hq; ++h) {
      const int kvh = h / (hq / hkv);
      for (int i = 0; i < tq; ++i) {
        const float* qi = &qv[((static_cast<size_t>(bi) * tq + i) * hq + h) * d];
        const int keys = std::min(tk, q_offset + i + 1);
        float m_row = -INFINITY;
        for (int j = 0; j < keys; ++j) {
          const float* kj = &kv[((static_cast<size_t>(bi) * tk_cap + j) * hkv + kvh) * d];
          float dot = 0.0f;
          for (int e = 0; e < d; ++e) dot += qi[e] * kj[e];
          dots[j] = dot;
          p[j] = dot * scale;
          m_row = std::max(m_row, p[j]);
        }
        float* oi = &o[((static_cast<size_t>(bi) * tq + i) * hq + h) * d];
        float* lse_i = lse != nullptr ? &lse[(static_cast<size_t>(bi) * hq + h) * tq + i] : nullptr;
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (fused) {
          // Online over 64-key tiles: the reference maximum m rises to a tile's maximum only when
          // that passes it by more than 8 (acc and l then shrink by exp(m_old - m_new)); P =
          // exp(s - m) is rounded against the current m and l sums the rounded values.
          float m = -INFINITY, l = 0.0f;
          for (int j0 = 0; j0 < keys; j0 += kFusedTile) {
            const int j1 = std::min(keys, j0 + kFusedTile);
            const float tile_max = *std::max_element(p.begin() + j0, p.begin() + j1);
            if (tile_max > m + kFusedSlack) {
              const float alpha = m == -INFINITY ? 1.0f : std::exp2((m - tile_max) * kLog2e);
              l *= alpha;
              for (float& a : acc) a *= alpha;
              m = tile_max;
            }
            for (int j = j0; j < j1; ++j) {
              const float pj = RoundToBf16(FusedExp(dots[j], scale, m));
              const float* vj = &vv[((static_cast<size_t>(bi) * tk_cap + j) * hkv + kvh) * d];
              l += pj;
              for (int e = 0; e < d; ++e) acc[e] += pj * vj[e];
            }
          }
          const float inv = l > 0.0f ? 1.0f / l : 0.0f;
          for (int e = 0; e < d; ++e) oi[e] = acc[e] * inv;
          if (lse_i != nullptr) *lse_i = m + std::log(l);
          continue;
        }
        // Per-head: the softmax over the row first (sum in double), P normalised, then rounded.
        double sum = 0.0;
        for (int j = 0; j < keys; ++j) {
          p[j] = std::exp(p[j] - m_row);
          sum += p[j];
        }
        const float inv = sum > 0 ? static_cast<float>(1.0 / sum) : 0.0f;
        for (int j = 0; j < keys; ++j) {
          const float pj = RoundToBf16(p[j] * inv);
          const float* vj = &vv[((static_cast<size_t>(bi) * tk_cap + j) * hkv + kvh) * d];
          for (int e = 0; e < d; ++e) acc[e] += pj * vj[e];
        }
        for (int e = 0; e < d; ++e) oi[e] = acc[e];
        if (lse_i != nullptr) *lse_i = m_row + static_cast<float>(std::log(sum));
      }
    }
  }
  Store(out, o);
}

void Bf16ReferenceBackend::PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k,
                                                 ConstOperand v, const KvPageTable& pages, int tq,
                                                 int hq, int hkv, int d, int q_offset,
                                                 int q_stride) {
  const int tk = q_offset + tq;
  const size_t row_bytes = static_cast<size_t>(hkv) * d * DTypeSize(k.dtype);
  std::vector<char> kc(tk * row_bytes), vc(tk * row_bytes);
  GatheredPagedAttention(this, out, q, k, v, pages, tq, hq, hkv, d, q_offset, q_stride, kc.data(),
                         vc.data(), tk);
}

void Bf16ReferenceBackend::AttentionBackward(Operand dq, Operand dk, Operand dv, ConstOperand dout,
                                             ConstOperand out, const float* lse, ConstOperand q,
                                             ConstOperand k, ConstOperand v, int b, int t, int hq,
                                             int hkv, int d, int q_stride, int kv_stride) {
  CheckAttentionSizes(t, t, t, hq, hkv, 0);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  const bool fused = fused_attention_(d);
  const size_t nq = static_cast<size_t>(b) * t * hq * d, nkv = static_cast<size_t>(b) * t * hkv * d;
  const std::vector<float> g = OperandValues(dout, nq), o = OperandValues(out, nq),
                           qv = RowValues(q, b * t, hq * d, q_stride),
                           kv = RowValues(k, b * t, hkv * d, kv_stride),
                           vv = RowValues(v, b * t, hkv * d, kv_stride);
  std::vector<float> gq(nq), gk(nkv), gv(nkv), p(t), dp(t);
  if (cudnn_graphs_ && cudnn_graphs_(d) && t >= 2) {
    CudnnGraphAttentionBackward(gq.data(), gk.data(), gv.data(), g.data(), o.data(), lse, qv.data(),
                                kv.data(), vv.data(), b, t, hq, hkv, d);
    StoreRows(dq, gq, b * t, hq * d, q_stride);
    StoreRows(dk, gk, b * t, hkv * d, kv_stride);
    StoreRows(dv, gv, b * t, hkv * d, kv_stride);
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  auto qrow = [&](int bi, int i, int h) {
    return ((static_cast<size_t>(bi) * t + i) * hq + h) * d;
  };
  auto kvrow = [&](int bi, int j, int h) {
    return ((static_cast<size_t>(bi) * t + j) * hkv + h) * d;
  };
  for (int bi = 0; bi < b; ++bi) {
    for (int h = 0; h < hq; ++h) {
      const int kvh = h / (hq / hkv);
      for (int i = 0; i < t; ++i) {
        const float* qi = &qv[qrow(bi, i, h)];
        const float* gi = &g[qrow(bi, i, h)];
        const float* oi = &o[qrow(bi, i, h)];
        float* dqi = &gq[qrow(bi, i, h)];
        const float row_lse = lse[(static_cast<size_t>(bi) * hq + h) * t + i];
        double dsum = 0.0;  // D_i
        for (int j = 0; j <= i; ++j) {
          const float* kj = &kv[kvrow(bi, j, kvh)];
          const float* vj = &vv[kvrow(bi, j, kvh)];
          float s = 0.0f, gv_dot = 0.0f;
          for (int e = 0; e < d; ++e) {
            s += qi[e] * kj[e];
            gv_dot += gi[e] * vj[e];
          }
          p[j] = fused ? FusedExp(s, scale, row_lse) : std::exp(s * scale - row_lse);
          dp[j] = gv_dot;
          if (!fused) dsum += static_cast<double>(p[j]) * dp[j];
        }
        if (fused) {
          float dot = 0.0f;
          for (int e = 0; e < d; ++e) dot += gi[e] * oi[e];
          dsum = dot;
        }
        for (int j = 0; j <= i; ++j) {
          const float pb = RoundToBf16(p[j]);
          const float ds = RoundToBf16(p[j] * (dp[j] - static_cast<float>(dsum)));
          const float* kj = &kv[kvrow(bi, j, kvh)];
          float* dkj = &gk[kvrow(bi, j, kvh)];
          float* dvj = &gv[kvrow(bi, j, kvh)];
          for (int e = 0; e < d; ++e) {
            dvj[e] += pb * gi[e];
            dqi[e] += ds * kj[e];
            dkj[e] += ds * qi[e];
          }
        }
      }
    }
  }
  for (float& x : gq) x *= scale;
  for (float& x : gk) x *= scale;
  StoreRows(dq, gq, b * t, hq * d, q_stride);
  StoreRows(dk, gk, b * t, hkv * d, kv_stride);
  StoreRows(dv, gv, b * t, hkv * d, kv_stride);
}

// Logits fp32 or bf16 (the CPU's arithmetic on their values, as the device's kernels widen
// them); the gradient apart (it may alias the logits), then stored in dlogits' dtype.
void Bf16ReferenceBackend::CrossEntropy(float* losses, float* max_prob, Operand dlogits,
                                        ConstOperand logits, const int32_t* targets,
                                        const float* weights, bool by_confidence, int n, int v) {
  const std::vector<float> l = OperandValues(logits, static_cast<size_t>(n) * v);
  if (dlogits.data == nullptr) {
    cpu_->CrossEntropy(losses, max_prob, Operand(), l.data(), targets, weights, by_confidence, n,
                       v);
    return;
  }
  std::vector<float> g(l.size());
  cpu_->CrossEntropy(losses, max_prob, g.data(), l.data(), targets, weights, by_confidence, n, v);
  Store(dlogits, g);
}

void Bf16ReferenceBackend::CrossEntropyGradRange(Operand dlogits, ConstOperand logits,
                                                 const float* row_max, const float* sum_exp,
                                                 const int32_t* targets, const float* weights,
                                                 bool by_confidence, int n, int v, int start) {
  const std::vector<float> l = OperandValues(logits, static_cast<size_t>(n) * v);
  std::vector<float> g(l.size());
  cpu_->CrossEntropyGradRange(g.data(), l.data(), row_max, sum_exp, targets, weights, by_confidence,
                              n, v, start);
  Store(dlogits, g);
}

void Bf16ReferenceBackend::RowMax(float* row_max, ConstOperand logits, int n, int v) {
  const std::vector<float> l = OperandValues(logits, static_cast<size_t>(n) * v);
  cpu_->RowMax(row_max, l.data(), n, v);
}

void Bf16ReferenceBackend::SumExpAndTarget(float* sum_exp, float* target_logit, ConstOperand logits,
                                           const float* row_max, const int32_t* targets, int n,
                                           int v, int start) {
  const std::vector<float> l = OperandValues(logits, static_cast<size_t>(n) * v);
  cpu_->SumExpAndTarget(sum_exp, target_logit, l.data(), row_max, targets, n, v, start);
}

// x *= alpha in fp32, rounded once to a bf16 x.
void Bf16ReferenceBackend::Scale(Operand x, float alpha, size_t n) {
  std::vector<float> values = OperandValues(x, n);
  cpu_->Scale(values.data(), alpha, n);
  Store(x, values);
}

}  // namespace eellm::testing
