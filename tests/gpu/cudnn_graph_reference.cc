// cuDNN's attention graphs, written out with their roundings (see the header).
#include "tests/gpu/cudnn_graph_reference.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "engine/core/dtype.h"

namespace eellm::testing {
namespace {

// A graph's fp32 tensor holds each value rounded once from its double computation.
float F(double x) { return static_cast<float>(x); }
// A bf16 tensor: through fp32, as the interpreter (and a tensor core's input) rounds it.
float Bf16(double x) { return Bf16ToFloat(FloatToBf16(static_cast<float>(x))); }

// Indexes of the dense [b, t, heads, d] values.
struct Layout {
  int t, hq, hkv, d;
  size_t Q(int bi, int i, int h) const { return ((static_cast<size_t>(bi) * t + i) * hq + h) * d; }
  size_t Kv(int bi, int j, int h) const {
    return ((static_cast<size_t>(bi) * t + j) * hkv + h) * d;
  }
};

double Dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int e = 0; e < d; ++e) s += static_cast<double>(a[e]) * b[e];
  return s;
}

// The scale as cudnn_attention.cc passes it.
float Scale(int d) { return 1.0f / std::sqrt(static_cast<float>(d)); }

// The scaled score of query i and key j: fp32(fp32(q . k) * scale).
float Score(const float* qi, const float* kj, int d, float scale) {
  return F(static_cast<double>(F(Dot(qi, kj, d))) * scale);
}

}  // namespace

void CudnnGraphAttentionForward(float* out, float* lse, const float* q, const float* k,
                                const float* v, int b, int t, int hq, int hkv, int d) {
  const Layout at{t, hq, hkv, d};
  const float scale = Scale(d);
  std::vector<float> e(t), p(t);
  for (int bi = 0; bi < b; ++bi) {
    for (int h = 0; h < hq; ++h) {
      const int kvh = h / (hq / hkv);
      for (int i = 0; i < t; ++i) {
        const float* qi = &q[at.Q(bi, i, h)];
        // Masked scores (-inf past the diagonal), their maximum, exp of the shifted scores and
        // their sum over the whole row (the masked ones add 0).
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < t; ++j) {
          e[j] = j <= i ? Score(qi, &k[at.Kv(bi, j, kvh)], d, scale)
                        : -std::numeric_limits<float>::infinity();
          mx = std::max(mx, e[j]);
        }
        double sum = 0;
        for (int j = 0; j < t; ++j) {
          e[j] = F(std::exp(static_cast<double>(F(static_cast<double>(e[j]) - mx))));
          sum += e[j];
        }
        const float fsum = F(sum);
        lse[(static_cast<size_t>(bi) * hq + h) * t + i] =
            F(static_cast<double>(mx) + F(std::log(static_cast<double>(fsum))));
        for (int j = 0; j < t; ++j) p[j] = Bf16(static_cast<double>(e[j]) / fsum);
        for (int c = 0; c < d; ++c) {
          double s = 0;
          for (int j = 0; j < t; ++j) s += static_cast<double>(p[j]) * v[at.Kv(bi, j, kvh) + c];
          out[at.Q(bi, i, h) + c] = F(s);
        }
      }
    }
  }
}

void CudnnGraphAttentionBackward(float* dq, float* dk, float* dv, const float* dout,
                                 const float* out, const float* lse, const float* q, const float* k,
                                 const float* v, int b, int t, int hq, int hkv, int d) {
  const Layout at{t, hq, hkv, d};
  const float scale = Scale(d);
  const int group = hq / hkv;
  const size_t tt = static_cast<size_t>(t) * t;
  // Per query head of a KV head: P and dS ([i, j], fp32), and the bf16 products dV, dK of that
  // head ([j, c]) before the group's sum.
  std::vector<float> p(tt), ds(tt), dv_head(static_cast<size_t>(group) * t * d),
      dk_head(static_cast<size_t>(group) * t * d);
  for (int bi = 0; bi < b; ++bi) {
    for (int kvh = 0; kvh < hkv; ++kvh) {
      for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        for (int i = 0; i < t; ++i) {
          const float* qi = &q[at.Q(bi, i, h)];
          const float* gi = &dout[at.Q(bi, i, h)];
          const float* oi = &out[at.Q(bi, i, h)];
          // rowsum(dO * O), each product an fp32 value.
          double rs = 0;
          for (int c = 0; c < d; ++c) rs += F(static_cast<double>(gi[c]) * oi[c]);
          const float row_sum = F(rs);
          const float stats = lse[(static_cast<size_t>(bi) * hq + h) * t + i];
          for (int j = 0; j < t; ++j) {
            const size_t ij = static_cast<size_t>(i) * t + j;
            const float y =
                j <= i ? F(static_cast<double>(Score(qi, &k[at.Kv(bi, j, kvh)], d, scale)) - stats)
                       : std::numeric_limits<float>::lowest();
            p[ij] = F(std::exp(static_cast<double>(y)));
            const float dp = F(Dot(gi, &v[at.Kv(bi, j, kvh)], d));
            const float centred = F(static_cast<double>(dp) - row_sum);
            ds[ij] = F(static_cast<double>(F(static_cast<double>(centred) * p[ij])) * scale);
          }
        }
        // dQ = dS K with the fp32 dS; dV = bf16(P)^T dO and dK = bf16(dS)^T Q, this head's.
        for (int i = 0; i < t; ++i) {
          for (int c = 0; c < d; ++c) {
            double s = 0;
            for (int j = 0; j < t; ++j) {
              s += static_cast<double>(ds[static_cast<size_t>(i) * t + j]) *
                   k[at.Kv(bi, j, kvh) + c];
            }
            dq[at.Q(bi, i, h) + c] = F(s);
          }
        }
        for (int j = 0; j < t; ++j) {
          for (int c = 0; c < d; ++c) {
            double sv = 0, sk = 0;
            for (int i = 0; i < t; ++i) {
              const size_t ij = static_cast<size_t>(i) * t + j;
              sv += static_cast<double>(Bf16(p[ij])) * dout[at.Q(bi, i, h) + c];
              sk += static_cast<double>(Bf16(ds[ij])) * q[at.Q(bi, i, h) + c];
            }
            const size_t jc = (static_cast<size_t>(g) * t + j) * d + c;
            // With GQA each head's product is a bf16 tensor; alone it is the output itself.
            dv_head[jc] = group > 1 ? Bf16(sv) : F(sv);
            dk_head[jc] = group > 1 ? Bf16(sk) : F(sk);
          }
        }
      }
      for (int j = 0; j < t; ++j) {
        for (int c = 0; c < d; ++c) {
          double sv = 0, sk = 0;
          for (int g = 0; g < group; ++g) {
            const size_t jc = (static_cast<size_t>(g) * t + j) * d + c;
            sv += dv_head[jc];
            sk += dk_head[jc];
          }
          dv[at.Kv(bi, j, kvh) + c] = F(sv);
          dk[at.Kv(bi, j, kvh) + c] = F(sk);
        }
      }
    }
  }
}

}  // namespace eellm::testing
