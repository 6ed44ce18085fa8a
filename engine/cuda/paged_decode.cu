// Decoding attention over paged KV caches, grouped by KV head and split over the keys
// (FlashDecoding style), for the segments of an inference pass (CudaBackend::PagedAttentionPass)
// whose query rows times the query heads of a KV head are at most 64 (4 blocks of 16 MMA rows):
// decoding steps (one row) and short speculative checks. The prefill kernel
// (flash_attention.cu) gives such a segment a block of 128 rows per query head, a few of them
// used, and reads each KV head's cache once per query head of its group; here a block's 16 rows
// are 16 of the segment's (token i, head j of the group) pairs, pair i * group + j, so each K and
// V tile is read once per 16 pairs of a KV head.
//
// One block per (key split, KV head and 16 of its pairs, segment) of 4 warps; each 64-key tile
// (loaded by the block, double-buffered, through the page table) gives each warp 16 keys, over
// which it keeps its own online softmax of the 16 rows (m16n8k16 MMAs, P rounded to bf16 for the
// product with V and summed rounded, as in the prefill kernel). At the end the four warps' rows are
// merged in shared memory. When the segments and KV heads alone would leave SMs idle (a few long
// sequences), the keys are split over blocks: each split writes its rows unnormalised with their
// (max, sum) to a workspace, and a second kernel merges the splits.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cuda/async_copy.cuh"
#include "engine/cuda/attention_tiles.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"
#include "engine/cuda/warp_mma.cuh"

namespace eellm::cuda {
namespace {

constexpr int kDecWarps = 4, kDecThreads = 32 * kDecWarps;
constexpr int kDecWarpKeys = 16;                    // keys a warp takes of each tile
constexpr int kDecKeys = kDecWarps * kDecWarpKeys;  // keys per tile
constexpr int kDecRows = 16;                        // MMA rows: (token, head of the group) pairs
constexpr int kMaxRowBlocks = 4;                    // blocks of 16 pairs a segment may take
constexpr int kMinSplitKeys = 4 * kDecKeys;         // keys a split takes at least

template <int D>
struct DecSmem {
  static constexpr size_t kRowBytes = sizeof(__nv_bfloat16) * (D + kSkew);
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = Align128(kQ + kRowBytes * kDecRows);      // K[0], K[1]
  static constexpr size_t kV = Align128(kK + 2 * kRowBytes * kDecKeys);  // V[0], V[1]
  static constexpr size_t kBytes = Align128(kV + 2 * kRowBytes * kDecKeys);
  // After the key loop, over K and V: each warp's rows in fp32, O [16][D], then m [16], l [16]
  // (the layout of a split's rows in the workspace too).
  static constexpr int kState = kDecRows * (D + 2);
  static_assert(kK + sizeof(float) * kDecWarps * kState <= kBytes, "the merge area fits");
};

// Merges `n` softmax states of row r, column c (state i at `states + i * stride`: O [16][D],
// m [16], l [16]); empty ones (m = -inf) weigh nothing. Returns O / l (0 for no keys at all) or,
// with m_out and l_out, O unnormalised with its max and sum.
template <int D>
__device__ float MergeRow(const float* states, int stride, int n, int r, int c,
                          float* m_out = nullptr, float* l_out = nullptr) {
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, states[i * stride + kDecRows * D + r]);
  float sum = 0.0f, acc = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float* st = states + i * stride;
    const float mi = st[kDecRows * D + r];
    if (mi == -INFINITY) continue;
    const float f = FastExp2((mi - mx) * kLog2e);
    sum += st[kDecRows * D + kDecRows + r] * f;
    acc += st[r * D + c] * f;
  }
  if (m_out != nullptr) {
    *m_out = mx;
    *l_out = sum;
    return acc;
  }
  return sum > 0.0f ? acc / sum : 0.0f;
}

// Where pair r of a segment lies in q or out (rows `row` elements apart): token r / group, query
// head kvh * group + r % group.
__device__ __forceinline__ size_t PairAt(const PagedSegment& sg, int r, int group, int kvh,
                                         size_t row, int d) {
  return (static_cast<size_t>(sg.row) + r / group) * row +
         static_cast<size_t>(kvh * group + r % group) * d;
}

// q, out: [rows of the pass, hq, D] (q's rows q_ld elements apart, out's dense); k, v: the pools of
// the paged caches ([pool rows, hkv, D]); segments[blockIdx.z] the block's segment; blockIdx.y its
// KV head (y / row_blocks) and pairs (16 (y % row_blocks) on; gridDim.y = hkv row_blocks);
// blockIdx.x its split: keys [x split_keys, (x + 1) split_keys). partial null (one split): writes
// out; else the split's state to partial[((z gridDim.y + y) splits + x) kState].
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kDecThreads)
    PagedDecodeKernel(OutT* out, float* partial, const InT* q, const InT* k, const InT* v,
                      const PagedSegment* segments, int hq, int hkv, int page_shift, float scale,
                      int split_keys, int q_ld) {
  EE_DYNAMIC_SHARED(smem);
  using L = DecSmem<D>;
  constexpr int kLd = D + kSkew;
  const PagedSegment sg = segments[blockIdx.z];
  const int group = hq / hkv, row_blocks = gridDim.y / hkv;
  const int kvh = blockIdx.y / row_blocks, row0 = (blockIdx.y % row_blocks) * kDecRows;
  const int rows = min(kDecRows, sg.rows * group - row0);  // this block's pairs: row0 + r
  if (rows <= 0) return;  // (block-uniform, before any barrier; nothing reads its state)
  const int k_begin = blockIdx.x * split_keys;
  const int k_end = min(sg.q_offset + sg.rows, k_begin + split_keys);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const size_t kv_stride = static_cast<size_t>(hkv) * D;
  const InT* kb = k + static_cast<size_t>(kvh) * D;
  const InT* vb = v + static_cast<size_t>(kvh) * D;

  __nv_bfloat16* qs = SmemTile<D, kDecRows>(smem, L::kQ);
  for (int e = threadIdx.x; e < kDecRows * D; e += kDecThreads) {
    const int r = e / D, c = e % D;
    const float x =
        r < rows ? LoadAsFloat(q + PairAt(sg, row0 + r, group, kvh, q_ld, D) + c) : 0.0f;
    qs[r * kLd + c] = __float2bfloat16(x);
  }
  auto load_kv = [&](int k0, int buf) {
    if (k0 >= k_end) return;
    LoadTile<D, InT, kDecKeys, kDecThreads>(SmemTile<D, kDecKeys>(smem, L::kK, buf), kb, kv_stride,
                                            k0, k_end, sg.pages, page_shift);
    LoadTile<D, InT, kDecKeys, kDecThreads>(SmemTile<D, kDecKeys>(smem, L::kV, buf), vb, kv_stride,
                                            k0, k_end, sg.pages, page_shift);
  };
  load_kv(k_begin, 0);
  CpAsyncCommit();
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8
  const float scale_log2 = scale * kLog2e;

  for (int k0 = k_begin, buf = 0; k0 < k_end; k0 += kDecKeys, buf ^= 1) {
    load_kv(k0 + kDecKeys, buf ^ 1);  // the other buffer, free since the last iteration's barrier
    CpAsyncCommit();
    CpAsyncWait<1>();                         // this tile
    __syncthreads();                          // (Q's plain stores too, at the first tile)
    const int w0 = k0 + warp * kDecWarpKeys;  // the warp's first key
    if (w0 < k_end) {                         // (warp-uniform)
      const __nv_bfloat16* ks = SmemTile<D, kDecKeys>(smem, L::kK, buf);
      const __nv_bfloat16* vs = SmemTile<D, kDecKeys>(smem, L::kV, buf);
      float s[kDecWarpKeys / 8][4] = {};
      ProductXYt<D, kDecWarpKeys>(s, qs, 0, ks, warp * kDecWarpKeys, lane);
      // Keys past the split, and past a row's own position (pair row0 + r is at q_offset +
      // (row0 + r) / group); only where the warp's keys reach past the block's first row's.
      if (w0 + kDecWarpKeys - 1 > sg.q_offset + row0 / group || w0 + kDecWarpKeys > k_end) {
#pragma unroll
        for (int n = 0; n < kDecWarpKeys / 8; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int key = w0 + n * 8 + 2 * t4 + i % 2, r = g + 8 * (i / 2);
            if (key >= k_end || key > sg.q_offset + (row0 + r) / group) s[n][i] = -INFINITY;
          }
        }
      }
      uint32_t p[1][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kDecWarpKeys / 8; ++n)
          tile_max = fmaxf(tile_max, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        tile_max *= scale;
        if (tile_max > m[half]) {
          if (m[half] != -INFINITY) {
            const float alpha = FastExp2((m[half] - tile_max) * kLog2e);
            l[half] *= alpha;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
              o[n][2 * half] *= alpha;
              o[n][2 * half + 1] *= alpha;
            }
          }
          m[half] = tile_max;
        }
        const float neg_m2 = m[half] == -INFINITY ? 0.0f : -m[half] * kLog2e;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kDecWarpKeys / 8; ++n) {
          const uint32_t pk = PackBf16x2(FastExp2(fmaf(s[n][2 * half], scale_log2, neg_m2)),
                                         FastExp2(fmaf(s[n][2 * half + 1], scale_log2, neg_m2)));
          p[0][n * 2 + half] = pk;  // the A operand: a[0], a[1] keys 0-7, a[2], a[3] keys 8-15
          sum += Bf16x2Lo(pk) + Bf16x2Hi(pk);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l[half] += sum;
      }
      AccumulatePY<D, 1>(o, p, vs, warp * kDecWarpKeys, lane);
    }
    __syncthreads();  // every warp is done with this buffer before it is loaded again
  }

  // The warps' states into shared memory (over K and V), then merged per (row, column).
  float* states = reinterpret_cast<float*>(smem + L::kK);
  float* mine = states + warp * L::kState;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = g + 8 * half;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      mine[r * D + n * 8 + 2 * t4] = o[n][2 * half];
      mine[r * D + n * 8 + 2 * t4 + 1] = o[n][2 * half + 1];
    }
    if (t4 == 0) {
      mine[kDecRows * D + r] = m[half];
      mine[kDecRows * D + kDecRows + r] = l[half];
    }
  }
  __syncthreads();
  float* split_state =
      partial == nullptr
          ? nullptr
          : partial + ((static_cast<size_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                       blockIdx.x) *
                          L::kState;
  for (int e = threadIdx.x; e < rows * D; e += kDecThreads) {
    const int r = e / D, c = e % D;
    if (split_state == nullptr) {
      StoreFloat(out + PairAt(sg, row0 + r, group, kvh, static_cast<size_t>(hq) * D, D) + c,
                 MergeRow<D>(states, L::kState, kDecWarps, r, c));
    } else {
      float mx, sum;
      split_state[r * D + c] = MergeRow<D>(states, L::kState, kDecWarps, r, c, &mx, &sum);
      if (c == 0) {
        split_state[kDecRows * D + r] = mx;
        split_state[kDecRows * D + kDecRows + r] = sum;
      }
    }
  }
}

// The splits' states of (KV head and pairs blockIdx.x, as the decoding kernel's y; segment
// blockIdx.y) merged into out.
template <int D, typename OutT>
__global__ void __launch_bounds__(kDecThreads)
    MergeDecodeSplitsKernel(OutT* out, const float* partial, const PagedSegment* segments, int hq,
                            int hkv, int splits) {
  constexpr int kState = DecSmem<D>::kState;
  const PagedSegment sg = segments[blockIdx.y];
  const int group = hq / hkv, row_blocks = gridDim.x / hkv;
  const int kvh = blockIdx.x / row_blocks, row0 = (blockIdx.x % row_blocks) * kDecRows;
  const int rows = min(kDecRows, sg.rows * group - row0);
  const float* states = partial + (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) *
                                      splits * static_cast<size_t>(kState);
  for (int e = threadIdx.x; e < rows * D; e += kDecThreads) {  // (none where rows <= 0)
    const int r = e / D, c = e % D;
    StoreFloat(out + PairAt(sg, row0 + r, group, kvh, static_cast<size_t>(hq) * D, D) + c,
               MergeRow<D>(states, kState, splits, r, c));
  }
}

template <int D, typename InT, typename OutT>
cudaError_t LaunchDecode(OutT* out, const InT* q, const InT* k, const InT* v,
                         const PagedSegment* segments, int count, int hq, int hkv, int page_shift,
                         int q_ld, const DecodeSplits& plan, float* partial, cudaStream_t s) {
  constexpr size_t kBytes = DecSmem<D>::kBytes;
  static const cudaError_t allowed = cudaFuncSetAttribute(
      PagedDecodeKernel<D, InT, OutT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (allowed != cudaSuccess) return allowed;
  const bool split = plan.splits > 1;
  const int y = hkv * plan.row_blocks;
  const cudaError_t e =
      LaunchKernel(PagedDecodeKernel<D, InT, OutT>, dim3(plan.splits, y, count), dim3(kDecThreads),
                   kBytes, s, out, split ? partial : nullptr, q, k, v, segments, hq, hkv,
                   page_shift, 1.0f / sqrtf(D), plan.split_keys, q_ld);
  if (e != cudaSuccess || !split) return e;
  return LaunchKernel(MergeDecodeSplitsKernel<D, OutT>, dim3(y, count), dim3(kDecThreads), 0, s,
                      out, static_cast<const float*>(partial), segments, hq, hkv, plan.splits);
}

template <typename InT, typename OutT>
cudaError_t Decode(OutT* out, const InT* q, const InT* k, const InT* v,
                   const PagedSegment* segments, int count, int hq, int hkv, int d, int page_shift,
                   int q_ld, const DecodeSplits& plan, float* partial, cudaStream_t s) {
  switch (d) {
    case 32:
      return LaunchDecode<32>(out, q, k, v, segments, count, hq, hkv, page_shift, q_ld, plan,
                              partial, s);
    case 64:
      return LaunchDecode<64>(out, q, k, v, segments, count, hq, hkv, page_shift, q_ld, plan,
                              partial, s);
    case 128:
      return LaunchDecode<128>(out, q, k, v, segments, count, hq, hkv, page_shift, q_ld, plan,
                               partial, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int PagedDecodeRows() { return kDecRows * kMaxRowBlocks; }

DecodeSplits PlanDecodeSplits(int sms, int count, int hkv, int max_pairs, int max_keys, int d) {
  sms = std::max(1, sms);
  DecodeSplits plan;
  plan.row_blocks = std::clamp((max_pairs + kDecRows - 1) / kDecRows, 1, kMaxRowBlocks);
  const int blocks = std::max(1, count * hkv * plan.row_blocks);
  const int tiles = (max_keys + kDecKeys - 1) / kDecKeys;
  // Two blocks an SM at least, each split at least kMinSplitKeys keys.
  const int wanted = (2 * sms + blocks - 1) / blocks;
  const int most = std::max(1, (max_keys + kMinSplitKeys - 1) / kMinSplitKeys);
  const int splits = std::clamp(wanted, 1, most);
  const int tiles_per_split = (tiles + splits - 1) / splits;
  plan.split_keys = std::max(1, tiles_per_split) * kDecKeys;
  plan.splits = std::max(1, (max_keys + plan.split_keys - 1) / plan.split_keys);
  if (plan.splits > 1) {
    plan.partial_bytes = sizeof(float) * static_cast<size_t>(count) * hkv * plan.row_blocks *
                         plan.splits * kDecRows * static_cast<size_t>(d + 2);
  }
  return plan;
}

cudaError_t PagedDecodeAttention(Elems out, Elems q, Elems k, Elems v, const PagedSegment* segments,
                                 int count, int page_tokens, int hq, int hkv, int d, int q_ld,
                                 const DecodeSplits& plan, float* partial, cudaStream_t s) {
  const int shift = PageShift(page_tokens);
  if (q.bf16 != k.bf16 || q.bf16 != v.bf16 || shift < 0 ||
      (plan.splits > 1 && partial == nullptr) || plan.row_blocks < 1 ||
      plan.row_blocks > kMaxRowBlocks) {
    return cudaErrorInvalidValue;
  }
  if (count == 0) return cudaSuccess;
  return WithElementType(out, [&](auto* o) {
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      return Decode(o, qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), segments, count,
                    hq, hkv, d, shift, q_ld, plan, partial, s);
    });
  });
}

}  // namespace eellm::cuda
