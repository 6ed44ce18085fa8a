// CpuBackend LayerNorm and RMSNorm, forward and backward. Row statistics are accumulated in
// double; the gain/bias gradients are reduced by column blocks with rows in order, so they are
// deterministic.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cpu/cpu_backend.h"

namespace eellm {
namespace {

constexpr int kColBlock = 128;

bool Parallel(int n, int c) { return static_cast<int64_t>(n) * c >= (int64_t{1} << 14); }

}  // namespace

void CpuBackend::LayerNormForward(Operand out_op, float* mean, float* rstd, const float* x,
                                  const float* g, const float* b, int n, int c, float eps) {
  float* out = out_op.f32();
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int r = 0; r < n; ++r) {
    const float* xr = x + static_cast<size_t>(r) * c;
    float* yr = out + static_cast<size_t>(r) * c;
    double s = 0.0;
    for (int j = 0; j < c; ++j) s += xr[j];
    const double mu = s / c;
    double ss = 0.0;
    for (int j = 0; j < c; ++j) {
      const double dlt = xr[j] - mu;
      ss += dlt * dlt;
    }
    const double rs = 1.0 / std::sqrt(ss / c + static_cast<double>(eps));
    const float muf = static_cast<float>(mu);
    const float rsf = static_cast<float>(rs);
    for (int j = 0; j < c; ++j) {
      const float nrm = (xr[j] - muf) * rsf;
      yr[j] = nrm * g[j] + (b != nullptr ? b[j] : 0.0f);
    }
    mean[r] = muf;
    rstd[r] = rsf;
  }
}

void CpuBackend::LayerNormBackward(float* dx, const float* dres, float* dg, float* db,
                                   const float* dout, const float* x, const float* g,
                                   const float* mean, const float* rstd, int n, int c) {
  // dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * g.
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int r = 0; r < n; ++r) {
    const float* xr = x + static_cast<size_t>(r) * c;
    const float* dyr = dout + static_cast<size_t>(r) * c;
    float* dxr = dx + static_cast<size_t>(r) * c;
    const float* dresr = dres != nullptr ? dres + static_cast<size_t>(r) * c : nullptr;
    const float mu = mean[r];
    const float rs = rstd[r];
    double sum_dn = 0.0;
    double sum_dn_n = 0.0;
    for (int j = 0; j < c; ++j) {
      const float nrm = (xr[j] - mu) * rs;
      const float dn = dyr[j] * g[j];
      sum_dn += dn;
      sum_dn_n += static_cast<double>(dn) * nrm;
    }
    const float mean_dn = static_cast<float>(sum_dn / c);
    const float mean_dn_n = static_cast<float>(sum_dn_n / c);
    for (int j = 0; j < c; ++j) {
      const float nrm = (xr[j] - mu) * rs;
      const float dn = dyr[j] * g[j];
      dxr[j] = (dresr != nullptr ? dresr[j] : 0.0f) + rs * (dn - mean_dn - nrm * mean_dn_n);
    }
  }
  // dg += sum_r dout * norm; db += sum_r dout.
  const int blocks = (c + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int cb = 0; cb < blocks; ++cb) {
    const int j0 = cb * kColBlock;
    const int j1 = std::min(c, j0 + kColBlock);
    double acc_g[kColBlock] = {};
    double acc_b[kColBlock] = {};
    for (int r = 0; r < n; ++r) {
      const float* xr = x + static_cast<size_t>(r) * c;
      const float* dyr = dout + static_cast<size_t>(r) * c;
      const float mu = mean[r];
      const float rs = rstd[r];
      for (int j = j0; j < j1; ++j) {
        acc_g[j - j0] += dyr[j] * ((xr[j] - mu) * rs);
        acc_b[j - j0] += dyr[j];
      }
    }
    for (int j = j0; j < j1; ++j) {
      dg[j] += static_cast<float>(acc_g[j - j0]);
      if (db != nullptr) db[j] += static_cast<float>(acc_b[j - j0]);
    }
  }
}

void CpuBackend::RmsNormForward(Operand out_op, float* rstd, const float* x, const float* g, int n,
                                int c, float eps) {
  float* out = out_op.f32();
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int r = 0; r < n; ++r) {
    const float* xr = x + static_cast<size_t>(r) * c;
    float* yr = out + static_cast<size_t>(r) * c;
    double ss = 0.0;
    for (int j = 0; j < c; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const float rs = static_cast<float>(1.0 / std::sqrt(ss / c + static_cast<double>(eps)));
    for (int j = 0; j < c; ++j) yr[j] = (xr[j] * rs) * g[j];
    rstd[r] = rs;
  }
}

void CpuBackend::RmsNormBackward(float* dx, const float* dres, float* dg, const float* dout,
                                 const float* x, const float* g, const float* rstd, int n, int c) {
  // dx = rstd * (dnorm - norm * mean(dnorm * norm)), norm = x * rstd, dnorm = dout * g.
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int r = 0; r < n; ++r) {
    const float* xr = x + static_cast<size_t>(r) * c;
    const float* dyr = dout + static_cast<size_t>(r) * c;
    float* dxr = dx + static_cast<size_t>(r) * c;
    const float* dresr = dres != nullptr ? dres + static_cast<size_t>(r) * c : nullptr;
    const float rs = rstd[r];
    double sum_dn_n = 0.0;
    for (int j = 0; j < c; ++j) sum_dn_n += static_cast<double>(dyr[j] * g[j]) * (xr[j] * rs);
    const float mean_dn_n = static_cast<float>(sum_dn_n / c);
    for (int j = 0; j < c; ++j) {
      const float nrm = xr[j] * rs;
      dxr[j] = (dresr != nullptr ? dresr[j] : 0.0f) + rs * (dyr[j] * g[j] - nrm * mean_dn_n);
    }
  }
  // dg += sum_r dout * norm.
  const int blocks = (c + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (Parallel(n, c))
  for (int cb = 0; cb < blocks; ++cb) {
    const int j0 = cb * kColBlock;
    const int j1 = std::min(c, j0 + kColBlock);
    double acc[kColBlock] = {};
    for (int r = 0; r < n; ++r) {
      const float* xr = x + static_cast<size_t>(r) * c;
      const float* dyr = dout + static_cast<size_t>(r) * c;
      const float rs = rstd[r];
      for (int j = j0; j < j1; ++j) acc[j - j0] += dyr[j] * (xr[j] * rs);
    }
    for (int j = j0; j < j1; ++j) dg[j] += static_cast<float>(acc[j - j0]);
  }
}

}  // namespace eellm
