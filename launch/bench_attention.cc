#include "launch/bench_attention.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/rng.h"
#include "engine/core/timer.h"
#include "engine/kv_pages.h"
#include "launch/bench_limits.h"

namespace eellm {
namespace {

// A backend buffer of n elements of `dtype`, filled from host values (or left as is).
struct DeviceOperand {
  DeviceOperand(Backend* be, DType dtype, size_t n, const std::vector<float>* values = nullptr)
      : be(be), op(be->Alloc(std::max<size_t>(1, n) * DTypeSize(dtype)), dtype) {
    if (values != nullptr) OperandFromHost(be, op, values->data(), n);
  }
  ~DeviceOperand() { be->Free(op.data); }
  DeviceOperand(const DeviceOperand&) = delete;
  DeviceOperand& operator=(const DeviceOperand&) = delete;
  Backend* be;
  Operand op;
};

// The median of `steps` synchronised runs of fn, after `warmup` untimed ones.
template <typename Fn>
double MedianSeconds(Backend* be, int warmup, int steps, Fn fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < steps; ++i) {
    be->Synchronize();
    Timer timer;
    fn();
    be->Synchronize();
    times.push_back(timer.Seconds());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// A decoding step of b sequences with t cached tokens each: their pages (16 tokens) spread over
// one pool in a shuffled order, as a serving pool's are; the step's new keys and values go to
// position t. Fills r's decode fields and prints its line.
template <typename Random>
void TimeDecoding(Backend* be, const AttentionBenchOptions& o, int b, int t, int hq, int hkv, int d,
                  Random& random, AttentionBenchResult* r) {
  const int page = 16, per_seq = t / page + 1, pages = b * per_seq;
  const DType dt = be->operand_dtype();
  const size_t row = static_cast<size_t>(hkv) * d, pool = static_cast<size_t>(pages) * page * row;
  std::vector<int32_t> order(pages);
  for (int i = 0; i < pages; ++i) order[i] = i;
  Rng shuffle(o.seed + 1);
  for (int i = pages - 1; i > 0; --i) std::swap(order[i], order[shuffle.Below(i + 1)]);
  DeviceOperand tables(be, DType::kF32, pages);  // (int32 page indices: 4 bytes each as well)
  be->CopyFromHost(tables.op.data, order.data(), order.size() * sizeof(int32_t));
  std::vector<KvPageTable> page_tables(b);
  std::vector<PagedRows> segments(b);
  for (int i = 0; i < b; ++i) {
    page_tables[i] = {order.data() + i * per_seq,
                      static_cast<const int32_t*>(tables.op.data) + i * per_seq, page, per_seq};
    segments[i] = {&page_tables[i], i, 1, t};
  }
  const std::vector<float> pk = random(pool), pv = random(pool);
  // The step's q, k, v as the parts of [b, (hq + 2 hkv) d] rows, as one GEMM projects them.
  const int stride = (hq + 2 * hkv) * d;
  const std::vector<float> xv = random(static_cast<size_t>(b) * stride);
  DeviceOperand k_pool(be, dt, pool, &pk), v_pool(be, dt, pool, &pv);
  DeviceOperand qkv(be, dt, xv.size(), &xv), out(be, dt, static_cast<size_t>(b) * hq * d);
  const Operand q = qkv.op, k = qkv.op.At(hq * d), v = qkv.op.At((hq + hkv) * d);
  r->decode_seconds = MedianSeconds(be, o.warmup, o.steps, [&] {
    be->PagedAttentionPass(out.op, q, k, v, k_pool.op, v_pool.op, segments, hq, hkv, d, stride,
                           stride);
  });
  r->decode_bytes = 2.0 * b * (t + 1.0) * row * DTypeSize(dt);
  r->copy_bandwidth = CopyBandwidth(be);
  const double rate = r->decode_bytes / r->decode_seconds;
  std::printf(
      "  decode    %10.4g ms  %10.4g GB/s of the cache read (%.0f%% of the copy bandwidth, "
      "%.4g GB/s): %d sequences of %d cached tokens, one new each\n",
      r->decode_seconds * 1e3, rate / 1e9, 100.0 * rate / r->copy_bandwidth,
      r->copy_bandwidth / 1e9, b, t);
}

}  // namespace

absl::StatusOr<AttentionBenchResult> RunAttentionBenchmark(const ModelConfig& mc, Backend* be,
                                                           const AttentionBenchOptions& o) {
  const int b = o.batch, t = o.seq > 0 ? o.seq : mc.max_seq_len;
  const int hq = mc.num_heads, hkv = mc.num_kv_heads, d = mc.head_dim();
  if (b < 1 || t < 1 || o.steps < 1 || o.warmup < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "need --batch, --seq (or the model's max_seq_len)",
        " and --steps >= 1 and --warmup >= 0, got ", b, ", ", t, ", ", o.steps, ", ", o.warmup));
  }
  if (hq < 1 || hkv < 1 || hq % hkv != 0 || d < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the model's heads ", hq, "/", hkv,
                                                   " and head dimension ", d, " cannot attend"));
  }
  const size_t nq = static_cast<size_t>(b) * t * hq * d, nkv = static_cast<size_t>(b) * t * hkv * d;
  const DType dt = be->operand_dtype();
  Rng rng(o.seed);
  auto random = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(rng.Normal());
    return v;
  };
  // q, k, v and their gradients as the parts of [b t, (hq + 2 hkv) d] rows, as the training
  // path lays them out where one GEMM projects all three (models/layers.cc, QkvLayout).
  const int stride = (hq + 2 * hkv) * d;
  const std::vector<float> xv = random(nq + 2 * nkv), gv = random(nq);
  DeviceOperand qkv(be, dt, nq + 2 * nkv, &xv), dout(be, dt, nq, &gv);
  DeviceOperand out(be, dt, nq), dqkv(be, dt, nq + 2 * nkv);
  const Operand q = qkv.op, k = qkv.op.At(hq * d), v = qkv.op.At((hq + hkv) * d);
  const Operand dq = dqkv.op, dk = dqkv.op.At(hq * d), dv = dqkv.op.At((hq + hkv) * d);
  DeviceOperand lse(be, DType::kF32, static_cast<size_t>(b) * hq * t);
  float* lse_p = static_cast<float*>(lse.op.data);

  AttentionBenchResult r;
  const double pairs = 0.5 * t * (t + 1.0);
  r.forward_flops = 4.0 * d * b * hq * pairs;
  r.backward_flops = 2.5 * r.forward_flops;
  std::printf(
      "attention: %s, batch %d, heads %d/%d, %d tokens, head dimension %d, backend %s (%s "
      "operands; q, k, v in rows of %d, as one GEMM projects them); median of %d runs\n",
      mc.style == ModelStyle::kGpt ? "gpt" : "llama", b, hq, hkv, t, d, be->name().c_str(),
      dt == DType::kBF16 ? "bf16" : "fp32", stride, o.steps);
  r.forward_seconds = MedianSeconds(be, o.warmup, o.steps, [&] {
    be->AttentionForward(out.op, lse_p, q, k, v, b, t, t, t, hq, hkv, d, 0, stride, stride);
  });
  r.backward_seconds = MedianSeconds(be, o.warmup, o.steps, [&] {
    be->AttentionBackward(dq, dk, dv, dout.op, out.op, lse_p, q, k, v, b, t, hq, hkv, d, stride,
                          stride);
  });
  std::printf("  forward   %10.4g ms  %10.4g TFLOP/s\n", r.forward_seconds * 1e3,
              r.forward_flops / r.forward_seconds / 1e12);
  std::printf("  backward  %10.4g ms  %10.4g TFLOP/s\n", r.backward_seconds * 1e3,
              r.backward_flops / r.backward_seconds / 1e12);
  TimeDecoding(be, o, b, t, hq, hkv, d, random, &r);
  return r;
}

}  // namespace eellm
