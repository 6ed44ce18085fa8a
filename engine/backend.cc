// MakeBackend: the factory that turns a device name ("cpu", "cuda") into a Backend.
#include "engine/backend.h"

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "engine/core/status.h"
#include "engine/cpu/cpu_backend.h"
#ifdef EELLM_HAVE_CUDA
#include "engine/cuda/make_cuda_backend.h"
#endif

namespace eellm {

void CheckAttentionSizes(int tq, int tk, int tk_cap, int hq, int hkv, int q_offset) {
  EE_CHECK(hkv > 0 && hq % hkv == 0, "hq=", hq, " is not a multiple of hkv=", hkv);
  EE_CHECK(tk <= tk_cap && q_offset >= 0 && q_offset + tq <= tk, "bad attention sizes tq=", tq,
           " tk=", tk, " tk_cap=", tk_cap, " q_offset=", q_offset);
}

void CheckAttentionStrides(int hq, int hkv, int d, int q_stride, int kv_stride) {
  EE_CHECK(q_stride >= hq * d && kv_stride >= hkv * d, "attention rows of stride ", q_stride,
           " (q) and ", kv_stride, " (k, v) cannot hold ", hq, " and ", hkv, " heads of ", d);
}

void CheckRopeShape(int heads, int head_dim, int stride) {
  EE_CHECK(head_dim % 2 == 0, "RoPE needs an even head_dim, got ", head_dim);
  EE_CHECK(heads >= 0 && stride >= heads * head_dim, "bad RoPE rows: ", heads, " heads of ",
           head_dim, " in rows of stride ", stride);
}

void CheckSwiGluShape(int rows, int cols, int stride) {
  EE_CHECK(rows >= 0 && cols >= 0 && stride >= cols, "bad SwiGLU shape: rows=", rows,
           " cols=", cols, " stride=", stride);
}

void CopyToPages(Backend* be, void* pool, const KvPageTable& pages, int first, int count,
                 const void* src, size_t row_bytes, size_t src_stride) {
  for (const PageRun& r : PageRuns(pages, first, count)) {
    const char* from =
        static_cast<const char*>(src) + static_cast<size_t>(r.pos - first) * src_stride;
    char* to = static_cast<char*>(pool) + r.row * row_bytes;
    if (src_stride == row_bytes) {
      be->Copy(to, from, r.count * row_bytes);
    } else {
      be->CopyRows(to, row_bytes, from, src_stride, row_bytes, r.count);
    }
  }
}

void Backend::CopyRows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, int rows) {
  for (int r = 0; r < rows; ++r) {
    Copy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch,
         row_bytes);
  }
}

void CopyFromPages(Backend* be, void* dst, const void* pool, const KvPageTable& pages, int first,
                   int count, size_t row_bytes) {
  for (const PageRun& r : PageRuns(pages, first, count)) {
    be->Copy(static_cast<char*>(dst) + static_cast<size_t>(r.pos - first) * row_bytes,
             static_cast<const char*>(pool) + r.row * row_bytes, r.count * row_bytes);
  }
}

void GatheredPagedAttention(Backend* be, Operand out, ConstOperand q, ConstOperand k,
                            ConstOperand v, const KvPageTable& pages, int tq, int hq, int hkv,
                            int d, int q_offset, int q_stride, void* k_buf, void* v_buf,
                            int buf_tokens) {
  const int tk = q_offset + tq;
  EE_CHECK(tk <= buf_tokens, "gathering ", tk, " keys into room for ", buf_tokens);
  const size_t row_bytes = static_cast<size_t>(hkv) * d * DTypeSize(k.dtype);
  CopyFromPages(be, k_buf, k.data, pages, 0, tk, row_bytes);
  CopyFromPages(be, v_buf, v.data, pages, 0, tk, row_bytes);
  be->AttentionForward(out, nullptr, q, ConstOperand(k_buf, k.dtype), ConstOperand(v_buf, v.dtype),
                       1, tq, tk, buf_tokens, hq, hkv, d, q_offset, q_stride, hkv * d);
}

void Backend::PagedAttentionPass(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                                 Operand k_pool, Operand v_pool,
                                 const std::vector<PagedRows>& segments, int hq, int hkv, int d,
                                 int q_stride, int kv_stride) {
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  const size_t elem = DTypeSize(k.dtype), row_bytes = static_cast<size_t>(hkv) * d * elem;
  for (const PagedRows& sg : segments) {
    const size_t kv_at = static_cast<size_t>(sg.row) * kv_stride;
    CopyToPages(this, k_pool.data, *sg.pages, sg.q_offset, sg.rows, k.At(kv_at).data, row_bytes,
                kv_stride * elem);
    CopyToPages(this, v_pool.data, *sg.pages, sg.q_offset, sg.rows, v.At(kv_at).data, row_bytes,
                kv_stride * elem);
    PagedAttentionForward(out.At(static_cast<size_t>(sg.row) * hq * d),
                          q.At(static_cast<size_t>(sg.row) * q_stride), k_pool, v_pool, *sg.pages,
                          sg.rows, hq, hkv, d, sg.q_offset, q_stride);
  }
}

void Backend::LinearResidual(float* out, const float* residual, ConstOperand in, const float* w,
                             const float* bias, int n, int in_dim, int out_dim) {
  Copy(out, residual, static_cast<size_t>(n) * out_dim * sizeof(float));
  Linear(out, in, w, bias, n, in_dim, out_dim, true);
}

void Backend::LinearGelu(Operand act, Operand pre, ConstOperand in, const float* w,
                         const float* bias, int n, int in_dim, int out_dim) {
  Linear(pre, in, w, bias, n, in_dim, out_dim, false);
  GeluForward(act, pre, static_cast<size_t>(n) * out_dim);
}

void Backend::LinearBackwardGelu(Operand dpre, float* dw, float* dbias, ConstOperand dout,
                                 ConstOperand act, ConstOperand pre, const float* w, int n,
                                 int in_dim, int out_dim) {
  LinearBackward(dpre, dw, dbias, dout, act, w, n, in_dim, out_dim, false);
  GeluBackward(dpre, dpre, pre, static_cast<size_t>(n) * in_dim);
}

double Backend::SumSquaresRanges(const float* x, const std::vector<Range>& ranges) {
  double total = 0.0;
  for (const Range& r : ranges) total += SumSquares(x + r.offset, r.count);
  return total;
}

void Backend::AdamWRuns(float* p, const float* g, float* m, float* v,
                        const std::vector<AdamWRun>& runs, float lr, float beta1, float beta2,
                        float eps, float weight_decay, int step) {
  for (const AdamWRun& r : runs) {
    AdamW(p + r.offset, g + r.offset, m + r.offset, v + r.offset, r.count, lr, beta1, beta2, eps,
          r.decay ? weight_decay : 0.0f, step);
  }
}

void OperandToHost(Backend* be, float* host, ConstOperand src, size_t n) {
  if (!src.is_bf16()) {
    be->CopyToHost(host, src.data, n * sizeof(float));
    return;
  }
  std::vector<bf16> bits(n);
  be->CopyToHost(bits.data(), src.data, n * sizeof(bf16));
  for (size_t i = 0; i < n; ++i) host[i] = Bf16ToFloat(bits[i]);
}

void OperandFromHost(Backend* be, Operand dst, const float* host, size_t n) {
  if (!dst.is_bf16()) {
    be->CopyFromHost(dst.data, host, n * sizeof(float));
    return;
  }
  std::vector<bf16> bits(n);
  for (size_t i = 0; i < n; ++i) bits[i] = FloatToBf16(host[i]);
  be->CopyFromHost(dst.data, bits.data(), n * sizeof(bf16));
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name) {
  if (name == "cpu") return std::unique_ptr<Backend>(std::make_unique<CpuBackend>());
  if (absl::StartsWith(name, "cuda")) {
#ifdef EELLM_HAVE_CUDA
    // cuda[-bf16][:<device>]
    absl::string_view rest = name.substr(4);
    const bool bf16 = absl::ConsumePrefix(&rest, "-bf16");
    const bool bf16_weights = bf16 && absl::ConsumePrefix(&rest, "w");
    int device = -1;
    if (!(rest.empty() || (absl::ConsumePrefix(&rest, ":") && absl::SimpleAtoi(rest, &device)))) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad backend \"", name,
                       "\": expected cuda, cuda-bf16 or cuda-bf16w, optionally with :<device>"));
    }
    return MakeCudaBackend(device, bf16, bf16_weights);
#else
    return absl::UnimplementedError(absl::StrCat(
        "backend \"", name,
        "\": this eellm was built without CUDA (nvcc was not found at configure time)"));
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend \"", name,
                   "\"; valid backends: cpu, cuda, cuda-bf16, cuda-bf16w (optionally :<device>)"));
}

}  // namespace eellm
