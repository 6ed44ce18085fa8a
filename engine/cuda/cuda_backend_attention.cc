// CudaBackend's attention (cuda_backend.h): cuDNN's fused flash attention for the training path
// where it has a plan (cudnn_attention.h), else our fused kernels (flash_attention.cu) for bf16
// operands, else per head through GEMMs around a row softmax; the paged (KV cache) variants.
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "engine/core/status.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kernels.h"

namespace eellm {

using cuda::ToElems;

namespace {
// Whether every pointer is 16-byte aligned (what both fused paths load and store in).
bool Aligned16(std::initializer_list<const void*> tensors) {
  for (const void* p : tensors) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Whether every row stride (in bytes) is a multiple of 16.
bool RowsAligned16(std::initializer_list<size_t> row_bytes) {
  for (size_t bytes : row_bytes) {
    if (bytes % 16 != 0) return false;
  }
  return true;
}

// The shape cuDNN's plans are keyed by: dense strides as 0 (AttentionShape's dense), so that one
// graph has one key.
cuda::AttentionShape CudnnShape(int b, int t, int hq, int hkv, int d, int q_stride, int kv_stride) {
  cuda::AttentionShape shape{b, t, hq, hkv, d};
  if (q_stride != hq * d) shape.q_stride = q_stride;
  if (kv_stride != hkv * d) shape.kv_stride = kv_stride;
  return shape;
}
}  // namespace

bool CudaBackend::UseFlash(int d, std::initializer_list<const void*> tensors,
                           std::initializer_list<size_t> row_bytes) const {
  return precision_ != GemmPrecision::kFp32 && cuda::FlashAttentionSupports(d) &&
         Aligned16(tensors) && RowsAligned16(row_bytes);
}

bool CudaBackend::UseCudnn(const cuda::AttentionShape& shape,
                           std::initializer_list<ConstOperand> bf16,
                           std::initializer_list<const void*> tensors) const {
  if (cudnn_attention_ == nullptr || !cuda::CudnnAttention::Offered(shape)) return false;
  for (const ConstOperand& x : bf16) {
    if (!x.is_bf16()) return false;
  }
  return Aligned16(tensors) &&
         RowsAligned16({shape.q_row() * sizeof(uint16_t), shape.kv_row() * sizeof(uint16_t)});
}

void CudaBackend::AttentionForward(Operand out_op, float* lse, ConstOperand q, ConstOperand k,
                                   ConstOperand v, int b, int tq, int tk, int tk_cap, int hq,
                                   int hkv, int d, int q_offset, int q_stride, int kv_stride) {
  CheckAttentionSizes(tq, tk, tk_cap, hq, hkv, q_offset);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  EE_CHECK(q.dtype == k.dtype && q.dtype == v.dtype, "attention q, k, v of different dtypes");
  const cuda::AttentionShape shape = CudnnShape(b, tq, hq, hkv, d, q_stride, kv_stride);
  if (lse != nullptr && q_offset == 0 && tq == tk && tk == tk_cap &&
      UseCudnn(shape, {out_op, q}, {out_op.data, lse, q.data, k.data, v.data}) &&
      cudnn_attention_->Forward(out_op.data, lse, q.data, k.data, v.data, shape)) {
    return;
  }
  const size_t elem = DTypeSize(q.dtype);
  if (UseFlash(d, {out_op.data, q.data, k.data, v.data}, {q_stride * elem, kv_stride * elem})) {
    CUDA_CHECK(cuda::FlashAttentionForward(ToElems(out_op), lse, ToElems(q), ToElems(k), ToElems(v),
                                           b, tq, tk, tk_cap, hq, hkv, d, q_offset, q_stride,
                                           kv_stride, stream_));
    return;
  }
  // Per head through GEMMs, into fp32 (a scratch copy converted at the end for a bf16 output).
  const size_t out_count = static_cast<size_t>(b) * tq * hq * d;
  float* out =
      out_op.is_bf16() ? static_cast<float*>(Scratch(out_count * sizeof(float), 5)) : out_op.f32();
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Sized for the cache's capacity, so that decoding does not regrow it token by token.
  float* s = static_cast<float*>(Scratch(static_cast<size_t>(tq) * tk_cap * sizeof(float), 0));
  for (int bi = 0; bi < b; ++bi) {
    for (int h = 0; h < hq; ++h) {
      const int kvh = h / group;
      const ConstOperand qh =
          q.At(static_cast<size_t>(bi) * tq * q_stride + static_cast<size_t>(h) * d);
      const size_t kv_at =
          static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * d;
      const ConstOperand kh = k.At(kv_at), vh = v.At(kv_at);
      float* oh = out + (static_cast<size_t>(bi) * tq * hq + h) * d;  // rows stride hq*d
      float* lse_h = lse ? lse + (static_cast<size_t>(bi) * hq + h) * tq : nullptr;
      Gemm(false, true, tq, tk, d, scale, qh, q_stride, kh, kv_stride, 0.0f, s, tk);
      CUDA_CHECK(cuda::CausalSoftmaxRows(s, lse_h, tq, tk, q_offset, stream_));
      Gemm(false, false, tq, d, tk, 1.0f, s, tk, vh, kv_stride, 0.0f, oh, hq * d);
    }
  }
  if (out_op.is_bf16()) CUDA_CHECK(cuda::ToBf16(out_op.bf16_bits(), out, out_count, stream_));
}

void CudaBackend::PagedAttentionForward(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                                        const KvPageTable& pages, int tq, int hq, int hkv, int d,
                                        int q_offset, int q_stride) {
  const int tk = q_offset + tq;
  CheckAttentionSizes(tq, tk, tk, hq, hkv, q_offset);
  CheckAttentionStrides(hq, hkv, d, q_stride, hkv * d);
  EE_CHECK(q.dtype == k.dtype && q.dtype == v.dtype, "attention q, k, v of different dtypes");
  if (UseFlash(d, {out.data, q.data, k.data, v.data}, {q_stride * DTypeSize(q.dtype)})) {
    CUDA_CHECK(cuda::FlashAttentionForwardPaged(ToElems(out), ToElems(q), ToElems(k), ToElems(v),
                                                pages.device, pages.page_tokens, tq, hq, hkv, d,
                                                q_offset, q_stride, stream_));
    return;
  }
  // Sized in steps of 1024 keys, so that decoding does not regrow the buffers token by token.
  const int cap = (tk + 1023) / 1024 * 1024;
  const size_t row_bytes = static_cast<size_t>(hkv) * d * DTypeSize(k.dtype);
  GatheredPagedAttention(this, out, q, k, v, pages, tq, hq, hkv, d, q_offset, q_stride,
                         Scratch(cap * row_bytes, 8), Scratch(cap * row_bytes, 9), cap);
}

void CudaBackend::PagedAttentionPass(Operand out, ConstOperand q, ConstOperand k, ConstOperand v,
                                     Operand k_pool, Operand v_pool,
                                     const std::vector<PagedRows>& segments, int hq, int hkv, int d,
                                     int q_stride, int kv_stride) {
  EE_CHECK(q.dtype == k.dtype && q.dtype == v.dtype && k_pool.dtype == k.dtype &&
               v_pool.dtype == k.dtype,
           "paged attention pass: q, k, v and the pools of different dtypes");
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  const size_t elem = DTypeSize(k.dtype), row_bytes = static_cast<size_t>(hkv) * d * elem;
  if (segments.empty() || segments.size() > 65535 ||  // (the grid's z limit)
      !UseFlash(d, {out.data, q.data, k.data, v.data, k_pool.data, v_pool.data},
                {row_bytes, q_stride * elem, kv_stride * elem})) {
    Backend::PagedAttentionPass(out, q, k, v, k_pool, v_pool, segments, hq, hkv, d, q_stride,
                                kv_stride);
    return;
  }
  const int page_tokens = segments[0].pages->page_tokens;
  // The descriptors: the segments (those of more rows than the decoding kernel takes first, the
  // decoding ones after them), then each row's pool row (-1 for rows of no segment).
  std::vector<cuda::PagedSegment> segs, decoding;
  std::vector<int32_t> pool_rows;
  int max_rows = 0, max_keys = 0, max_pairs = 0;
  for (const PagedRows& sg : segments) {
    CheckAttentionSizes(sg.rows, sg.q_offset + sg.rows, sg.q_offset + sg.rows, hq, hkv,
                        sg.q_offset);
    EE_CHECK(sg.pages->page_tokens == page_tokens, "a pass's page tables of ", page_tokens, " and ",
             sg.pages->page_tokens, " tokens a page");
    EE_CHECK(sg.q_offset + sg.rows <= sg.pages->tokens(),
             "KV cache overflow: ", sg.q_offset + sg.rows, " > ", sg.pages->tokens());
    if (sg.rows == 0) continue;  // (no rows to write, none to attend)
    const cuda::PagedSegment desc{sg.pages->device, sg.row, sg.rows, sg.q_offset, 0};
    const int64_t pairs = static_cast<int64_t>(sg.rows) * (hq / hkv);
    if (pairs <= cuda::PagedDecodeRows()) {
      decoding.push_back(desc);
      max_keys = std::max(max_keys, sg.q_offset + sg.rows);
      max_pairs = std::max(max_pairs, static_cast<int>(pairs));
    } else {
      segs.push_back(desc);
      max_rows = std::max(max_rows, sg.rows);
    }
    if (pool_rows.size() < static_cast<size_t>(sg.row + sg.rows))
      pool_rows.resize(sg.row + sg.rows, -1);
    for (int j = 0; j < sg.rows; ++j) {
      pool_rows[sg.row + j] = static_cast<int32_t>(sg.pages->Row(sg.q_offset + j));
    }
  }
  const int prefill = static_cast<int>(segs.size()), decode = static_cast<int>(decoding.size());
  segs.insert(segs.end(), decoding.begin(), decoding.end());
  const size_t seg_bytes = segs.size() * sizeof(cuda::PagedSegment);
  std::vector<unsigned char> desc(seg_bytes + pool_rows.size() * sizeof(int32_t));
  std::memcpy(desc.data(), segs.data(), seg_bytes);
  std::memcpy(desc.data() + seg_bytes, pool_rows.data(), pool_rows.size() * sizeof(int32_t));
  void* dev = Scratch(desc.size(), 11);
  if (dev != pass_descriptors_at_ || desc != pass_descriptors_) {
    // Stream-ordered (the kernels of earlier passes read the old descriptors first); from
    // pageable memory the call returns once the bytes are staged.
    CUDA_CHECK(cudaMemcpyAsync(dev, desc.data(), desc.size(), cudaMemcpyHostToDevice, stream_));
    pass_descriptors_ = std::move(desc);
    pass_descriptors_at_ = dev;
  }
  auto* dev_segs = static_cast<const cuda::PagedSegment*>(dev);
  auto* dev_rows = reinterpret_cast<const int32_t*>(static_cast<unsigned char*>(dev) + seg_bytes);
  CUDA_CHECK(cuda::CopyRowsToPools(k_pool.data, v_pool.data, k.data, v.data, dev_rows,
                                   static_cast<int>(pool_rows.size()), row_bytes, kv_stride * elem,
                                   stream_));
  if (prefill > 0) {
    CUDA_CHECK(cuda::FlashAttentionForwardSegments(ToElems(out), ToElems(q), ToElems(k_pool),
                                                   ToElems(v_pool), dev_segs, prefill, max_rows,
                                                   page_tokens, hq, hkv, d, q_stride, stream_));
  }
  if (decode > 0) {
    const cuda::DecodeSplits plan =
        cuda::PlanDecodeSplits(sm_count_, decode, hkv, max_pairs, max_keys, d);
    float* partial = plan.partial_bytes > 0
                         ? static_cast<float*>(Scratch(plan.partial_bytes, kDecodeScratch))
                         : nullptr;
    CUDA_CHECK(cuda::PagedDecodeAttention(ToElems(out), ToElems(q), ToElems(k_pool),
                                          ToElems(v_pool), dev_segs + prefill, decode, page_tokens,
                                          hq, hkv, d, q_stride, plan, partial, stream_));
  }
}

void CudaBackend::AttentionBackward(Operand dq_op, Operand dk_op, Operand dv_op, ConstOperand dout,
                                    ConstOperand out, const float* lse, ConstOperand q,
                                    ConstOperand k, ConstOperand v, int b, int t, int hq, int hkv,
                                    int d, int q_stride, int kv_stride) {
  CheckAttentionSizes(t, t, t, hq, hkv, 0);
  CheckAttentionStrides(hq, hkv, d, q_stride, kv_stride);
  // As on the CPU: P = exp(scale Q K^T - lse) recomputed; dV = P^T dO; dP = dO V^T;
  // dS = P * (dP - rowsum(P * dP)); dQ = scale dS K; dK = scale dS^T Q, dK and dV summed over
  // the heads sharing a KV head, in head order. (rowsum(P * dP) equals dO . O, which the CPU
  // uses; the fused kernels use it.)
  EE_CHECK(q.dtype == k.dtype && q.dtype == v.dtype, "attention q, k, v of different dtypes");
  EE_CHECK(dq_op.dtype == q.dtype && dk_op.dtype == q.dtype && dv_op.dtype == q.dtype,
           "attention gradients dq, dk, dv must have q's dtype ", DTypeName(q.dtype));
  EE_CHECK(dout.dtype == out.dtype, "attention dout must have out's dtype ", DTypeName(out.dtype));
  const cuda::AttentionShape shape = CudnnShape(b, t, hq, hkv, d, q_stride, kv_stride);
  if (UseCudnn(
          shape, {dq_op, dout, q},
          {dq_op.data, dk_op.data, dv_op.data, dout.data, out.data, lse, q.data, k.data, v.data}) &&
      cudnn_attention_->Backward(dq_op.data, dk_op.data, dv_op.data, dout.data, out.data, lse,
                                 q.data, k.data, v.data, shape)) {
    return;
  }
  const size_t elem = DTypeSize(q.dtype);
  if (UseFlash(d, {dq_op.data, dk_op.data, dv_op.data, dout.data, out.data, q.data, k.data, v.data},
               {q_stride * elem, kv_stride * elem})) {
    float* dsum = static_cast<float*>(Scratch(static_cast<size_t>(b) * hq * t * sizeof(float), 0));
    CUDA_CHECK(cuda::FlashAttentionBackward(
        ToElems(dq_op), ToElems(dk_op), ToElems(dv_op), ToElems(dout), ToElems(out), lse, dsum,
        ToElems(q), ToElems(k), ToElems(v), b, t, hq, hkv, d, q_stride, kv_stride, stream_));
    return;
  }
  // The unfused path recomputes everything from Q, K, V and the lse; it does not read `out`. It
  // accumulates in fp32: bf16 gradients go through dense scratch, converted into their rows at
  // the end; fp32 ones are written in place at their strides.
  const int rows = b * t;
  const size_t nq = static_cast<size_t>(rows) * hq * d, nkv = static_cast<size_t>(rows) * hkv * d;
  const bool bf16 = dq_op.is_bf16();
  float* grads = bf16 ? static_cast<float*>(Scratch((nq + 2 * nkv) * sizeof(float), 5)) : nullptr;
  float* dq = bf16 ? grads : dq_op.f32();
  float* dk = bf16 ? grads + nq : dk_op.f32();
  float* dv = bf16 ? grads + nq + nkv : dv_op.f32();
  const int ldq = bf16 ? hq * d : q_stride, ldkv = bf16 ? hkv * d : kv_stride;
  const int group = hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  float* p = static_cast<float*>(Scratch(static_cast<size_t>(t) * t * sizeof(float), 0));
  float* ds = static_cast<float*>(Scratch(static_cast<size_t>(t) * t * sizeof(float), 1));
  for (int bi = 0; bi < b; ++bi) {
    for (int kvh = 0; kvh < hkv; ++kvh) {
      const size_t kv_off = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * d;
      const size_t dkv_off = static_cast<size_t>(bi) * t * ldkv + static_cast<size_t>(kvh) * d;
      const size_t pitch = static_cast<size_t>(ldkv) * sizeof(float);
      CUDA_CHECK(cudaMemset2DAsync(dk + dkv_off, pitch, 0, d * sizeof(float), t, stream_));
      CUDA_CHECK(cudaMemset2DAsync(dv + dkv_off, pitch, 0, d * sizeof(float), t, stream_));
      const ConstOperand kh = k.At(kv_off), vh = v.At(kv_off);
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        const ConstOperand qh =
            q.At(static_cast<size_t>(bi) * t * q_stride + static_cast<size_t>(h) * d);
        const ConstOperand doh = dout.At((static_cast<size_t>(bi) * t * hq + h) * d);
        const size_t dq_off = static_cast<size_t>(bi) * t * ldq + static_cast<size_t>(h) * d;
        Gemm(false, true, t, t, d, scale, qh, q_stride, kh, kv_stride, 0.0f, p, t);
        CUDA_CHECK(cuda::ProbsFromLse(p, lse + (static_cast<size_t>(bi) * hq + h) * t, t, stream_));
        Gemm(true, false, t, d, t, 1.0f, p, t, doh, hq * d, 1.0f, dv + dkv_off, ldkv);
        Gemm(false, true, t, t, d, 1.0f, doh, hq * d, vh, kv_stride, 0.0f, ds, t);
        CUDA_CHECK(cuda::SoftmaxBackwardRows(ds, p, t, stream_));
        Gemm(false, false, t, d, t, scale, ds, t, kh, kv_stride, 0.0f, dq + dq_off, ldq);
        Gemm(true, false, t, d, t, scale, ds, t, qh, q_stride, 1.0f, dk + dkv_off, ldkv);
      }
    }
  }
  if (bf16) {
    CUDA_CHECK(cuda::ToBf16Rows(dq_op.bf16_bits(), q_stride, dq, rows, hq * d, stream_));
    CUDA_CHECK(cuda::ToBf16Rows(dk_op.bf16_bits(), kv_stride, dk, rows, hkv * d, stream_));
    CUDA_CHECK(cuda::ToBf16Rows(dv_op.bf16_bits(), kv_stride, dv, rows, hkv * d, stream_));
  }
}

}  // namespace eellm
