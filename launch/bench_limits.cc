// The device limits of bench_limits.h.
#include "launch/bench_limits.h"

#include <algorithm>
#include <vector>

#include "engine/core/timer.h"
#include "engine/tensor/tensor.h"

namespace eellm {
namespace {

// `work` per second of the best of 4 runs of `op`, each synchronised before and after.
template <typename Op>
double BestRate(Backend* be, double work, Op op) {
  double best = 0;
  for (int i = 0; i < 4; ++i) {
    be->Synchronize();
    Timer timer;
    op();
    be->Synchronize();
    best = std::max(best, work / timer.Seconds());
  }
  return best;
}

}  // namespace

double GemmCeiling(Backend* be) {
  const int n = be->device() == Device::kCpu ? 1024 : 4096;
  const size_t nn = static_cast<size_t>(n) * n;
  const DType t = be->operand_dtype();
  Buffer a(be, DTypeSize(t) * nn), w(be, sizeof(float) * nn), c(be, DTypeSize(t) * nn);
  OperandFromHost(be, Operand(a.data(), t), std::vector<float>(nn, 0.01f).data(), nn);
  be->Fill(w.f32(), nn, 0.02f);
  be->RegisterWeights(w.f32(), nn);
  const double rate = BestRate(be, 2.0 * n * n * n, [&] {
    be->Linear(Operand(c.data(), t), ConstOperand(a.data(), t), w.f32(), nullptr, n, n, n, false);
  });
  be->UnregisterWeights(w.f32());
  return rate;
}

double CopyBandwidth(Backend* be) {
  const size_t bytes = size_t{1} << (be->device() == Device::kCpu ? 26 : 30);
  Buffer a(be, bytes), b(be, bytes);
  be->Fill(a.f32(), bytes / sizeof(float), 1.0f);
  be->Fill(b.f32(), bytes / sizeof(float), 0.0f);
  return BestRate(be, 2.0 * bytes, [&] { be->Copy(b.data(), a.data(), bytes); });
}

}  // namespace eellm
