// Fused causal attention with grouped-query heads on tensor cores (FlashAttention-2 style):
// bf16 operands, fp32 accumulation, online softmax; no [t, t] tensor is ever stored. Inputs and
// outputs are fp32 or bf16 (see the end of this comment); fp32 tiles are rounded to bf16 as they
// are loaded into shared memory, bf16 ones copied. The matrix products use the WMMA API (16x16x16
// bf16 fragments), and the elementwise softmax steps go through shared memory, where each lane
// knows its row (WMMA does not expose the accumulator layout). Head dimensions 32, 64 and 128.
//
// Forward: one block per (64 queries, head, sequence); 4 warps of 16 query rows each. A warp's
// output rows stay in its accumulator fragments across the key tiles; the online softmax raises a
// row's reference maximum only when a tile passes it by more than kRescaleSlack, and only then
// rescales O (through shared memory).
// Backward (deterministic, no atomics): one kernel for dK and dV per (64 keys, KV head,
// sequence) that loops over the heads of its group and the query tiles in a fixed order, and
// one kernel for dQ per (64 queries, head, sequence). Each recomputes P from the saved
// log-sum-exps; D_i = dO_i . O_i comes from a small kernel before them. Every operand is fp32 or
// bf16 (engine/tensor/operand.h): q, k, v and dq, dk, dv of one type (InT), O and dO of one type
// (OutT).
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "engine/cuda/block_reduce.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

using namespace nvcuda;  // NOLINT: wmma::

constexpr int kTile = 64;  // queries and keys per tile
constexpr int kWarps = 4;  // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr int kSkew = 8;   // bf16 row padding (keeps wmma's 16-byte ld rule, spreads banks)
constexpr int kFSkew = 4;  // fp32 row padding

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__host__ __device__ constexpr size_t Align128(size_t x) { return (x + 127) / 128 * 128; }

// Copies rows [row0, row0 + kTile) of a strided fp32 or bf16 matrix (row r at src + r * stride,
// D values) into a bf16 tile [kTile][D + kSkew] (fp32 rounded, bf16 copied); rows at or past
// `rows` become zeros (so NaN in unused cache rows never reaches a product).
// 16 bytes per load: a float4 (rounded to 4 bf16) or 8 bf16 (copied); the rows and the tile's
// rows of D + kSkew bf16 are multiples of 16 bytes for D in {32, 64, 128}.
template <int D, typename InT>
__device__ void LoadTile(__nv_bfloat16* dst, const InT* src, size_t stride, int row0, int rows) {
  constexpr int kPer = 16 / sizeof(InT);  // values per load
  constexpr int kVec = D / kPer;
  for (int i = threadIdx.x; i < kTile * kVec; i += kThreads) {
    const int r = i / kVec, c = (i % kVec) * kPer;
    const InT* from = src + static_cast<size_t>(row0 + r) * stride + c;
    __nv_bfloat16* d = dst + r * (D + kSkew) + c;
    if constexpr (std::is_same_v<InT, float>) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row0 + r < rows) x = *reinterpret_cast<const float4*>(from);
      d[0] = __float2bfloat16(x.x);
      d[1] = __float2bfloat16(x.y);
      d[2] = __float2bfloat16(x.z);
      d[3] = __float2bfloat16(x.w);
    } else {
      uint4 x = make_uint4(0u, 0u, 0u, 0u);  // bf16 zeros
      if (row0 + r < rows) x = *reinterpret_cast<const uint4*>(from);
      *reinterpret_cast<uint4*>(d) = x;
    }
  }
}

// acc_w [16, 64] = X_w Y^T for the warp's 16 rows of x (bf16 [.][D + kSkew]) against the 64
// rows of y, stored to fp32 work rows (ld kTile + kFSkew).
template <int D>
__device__ void WarpProductT(float* work, const __nv_bfloat16* x_rows, const __nv_bfloat16* y) {
  constexpr int kLd = D + kSkew;
  for (int j = 0; j < kTile / 16; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA a;
      FragBCol bt;
      wmma::load_matrix_sync(a, x_rows + kk * 16, kLd);
      wmma::load_matrix_sync(bt, y + j * 16 * kLd + kk * 16, kLd);
      wmma::mma_sync(acc, a, bt, acc);
    }
    wmma::store_matrix_sync(work + j * 16, acc, kTile + kFSkew, wmma::mem_row_major);
  }
}

// acc[j] += P_w [16, 64] (bf16, ld kTile + kSkew) times y [64, D] (bf16 rows).
template <int D>
__device__ void WarpAccumulate(FragC* acc, const __nv_bfloat16* p_rows, const __nv_bfloat16* y) {
  constexpr int kLd = D + kSkew;
  for (int j = 0; j < D / 16; ++j) {
    for (int kk = 0; kk < kTile / 16; ++kk) {
      FragA a;
      FragBRow b;
      wmma::load_matrix_sync(a, p_rows + kk * 16, kTile + kSkew);
      wmma::load_matrix_sync(b, y + kk * 16 * kLd + j * 16, kLd);
      wmma::mma_sync(acc[j], a, b, acc[j]);
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------

// A row's probabilities are taken against a reference maximum that is raised only when a key
// tile's maximum exceeds it by more than this (natural log units): P then stays below e^8 ~ 3000,
// far from overflow in bf16 and fp32 and with the same relative precision, and O (registers)
// needs rescaling only when a row's reference moves.
constexpr float kRescaleSlack = 8.0f;

template <int D>
struct FwdSmem {
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = Align128(kQ + sizeof(__nv_bfloat16) * kTile * (D + kSkew));
  static constexpr size_t kV = Align128(kK + sizeof(__nv_bfloat16) * kTile * (D + kSkew));
  static constexpr size_t kS = Align128(kV + sizeof(__nv_bfloat16) * kTile * (D + kSkew));
  static constexpr size_t kP = Align128(kS + sizeof(float) * kTile * (kTile + kFSkew));
  static constexpr size_t kO = Align128(kP + sizeof(__nv_bfloat16) * kTile * (kTile + kSkew));
  static constexpr size_t kBytes = Align128(kO + sizeof(float) * kTile * (D + kFSkew));
};

// q, out: [b, tq, hq, D]; k, v: [b, tk_cap, hkv, D]; lse: [b, hq, tq] or null. InT (q, k, v)
// and OutT: float or __nv_bfloat16.
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    FlashForwardKernel(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int tq,
                       int tk, int tk_cap, int hq, int hkv, int q_offset, float scale) {
  EE_DYNAMIC_SHARED(smem);
  __shared__ unsigned votes[kWarps];
  using L = FwdSmem<D>;
  auto* qs = reinterpret_cast<__nv_bfloat16*>(smem + L::kQ);
  auto* ks = reinterpret_cast<__nv_bfloat16*>(smem + L::kK);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(smem + L::kV);
  auto* ss = reinterpret_cast<float*>(smem + L::kS);
  auto* ps = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  auto* os = reinterpret_cast<float*>(smem + L::kO);
  constexpr int kLd = D + kSkew, kLdS = kTile + kFSkew, kLdP = kTile + kSkew, kLdO = D + kFSkew;

  const int q0 = blockIdx.x * kTile, h = blockIdx.y, bi = blockIdx.z;
  const int kvh = h / (hq / hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t q_stride = static_cast<size_t>(hq) * D, kv_stride = static_cast<size_t>(hkv) * D;
  const InT* qb = q + static_cast<size_t>(bi) * tq * q_stride + static_cast<size_t>(h) * D;
  const InT* kb = k + static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * D;
  const InT* vb = v + static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * D;

  LoadTile<D>(qs, qb, q_stride, q0, tq);
  // O_w: the warp's 16 output rows, in accumulator fragments for the whole key loop.
  FragC o[D / 16];
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(o[j], 0.0f);
  float* o_w = os + warp * 16 * kLdO;  // staging of O_w (rescaling, the final store)
  // Lane pair (2r, 2r + 1) owns row r of the warp's 16; each lane half of the columns.
  const int r = lane / 2, half = lane % 2;
  const int row = warp * 16 + r;         // row in the tile
  const int qpos = q_offset + q0 + row;  // absolute position of this query
  float m = -INFINITY, l = 0.0f;         // the row's reference maximum and sum of exp(s - m)

  const int last_q = min(q0 + kTile, tq) - 1;
  const int n_keys = min(tk, q_offset + last_q + 1);
  for (int k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // previous tile's K/V reads are done (and Q loaded)
    LoadTile<D>(ks, kb, kv_stride, k0, tk);
    LoadTile<D>(vs, vb, kv_stride, k0, tk);
    __syncthreads();
    WarpProductT<D>(ss + warp * 16 * kLdS, qs + warp * 16 * kLd, ks);  // S_w = Q_w K^T
    __syncwarp();
    // Online softmax on this lane's 32 columns of its row.
    float* srow = ss + row * kLdS + half * 32;
    __nv_bfloat16* prow = ps + row * kLdP + half * 32;
    float tile_max = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int key = k0 + half * 32 + c;
      const bool valid = key <= qpos && key < tk;
      const float s = valid ? srow[c] * scale : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    // Raise the reference when the tile's maximum passes it by more than the slack (always at
    // the row's first valid key); O and l, taken against the old reference, shrink by alpha.
    // Before the first valid key O and l are zero, so only later raises rescale O.
    const bool raise = tile_max > m + kRescaleSlack;
    const bool rescale = raise && m != -INFINITY;
    const float alpha = rescale ? __expf(m - tile_max) : 1.0f;
    if (raise) {
      m = tile_max;
      l *= alpha;
    }
    // Through shared memory (WMMA does not say which lane holds a row), by the whole block when
    // any row needs it (the branch stays uniform).
    if (BlockAny(rescale, votes)) {
      for (int j = 0; j < D / 16; ++j) {
        wmma::store_matrix_sync(o_w + j * 16, o[j], kLdO, wmma::mem_row_major);
      }
      __syncwarp();
      float* orow = os + row * kLdO + half * (D / 2);
      for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
      __syncwarp();
      for (int j = 0; j < D / 16; ++j) {
        wmma::load_matrix_sync(o[j], o_w + j * 16, kLdO, wmma::mem_row_major);
      }
    }
    float sum = 0.0f;
    for (int c = 0; c < 32; ++c) {
      const float p = srow[c] == -INFINITY ? 0.0f : __expf(srow[c] - m);
      const __nv_bfloat16 pb = __float2bfloat16(p);
      prow[c] = pb;
      sum += __bfloat162float(pb);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l += sum;
    __syncwarp();
    WarpAccumulate<D>(o, ps + warp * 16 * kLdP, vs);  // O_w += P_w V
  }
  for (int j = 0; j < D / 16; ++j) {
    wmma::store_matrix_sync(o_w + j * 16, o[j], kLdO, wmma::mem_row_major);
  }
  __syncwarp();
  if (q0 + row < tq) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    OutT* orow = out + (static_cast<size_t>(bi) * tq + q0 + row) * q_stride +
                 static_cast<size_t>(h) * D + half * (D / 2);
    const float* src = os + row * kLdO + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) StoreFloat(orow + c, src[c] * inv);
    if (lse != nullptr && half == 0) {
      lse[(static_cast<size_t>(bi) * hq + h) * tq + q0 + row] = m + logf(l);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

// dsum[b, hq, t] = dO_i . O_i (fp32; one warp per row). With a bf16 O (cuda-bf16w) this is the
// dot product with the rounded O, so a row of dS sums to zero only within bf16 rounding (the
// model parity tolerances allow for it).
template <typename OutT>
__global__ void RowDotKernel(float* dsum, const OutT* dout, const OutT* out, int t, int hq, int d,
                             int rows) {
  const int warp_row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp_row >= rows) return;
  // warp_row enumerates (b, h, i) in lse order; the data rows are [b, t, hq, d].
  const int i = warp_row % t, h = (warp_row / t) % hq, bi = warp_row / (t * hq);
  const size_t off = ((static_cast<size_t>(bi) * t + i) * hq + h) * d;
  float acc = 0.0f;
  for (int e = lane; e < d; e += 32)
    acc += LoadAsFloat(dout + off + e) * LoadAsFloat(out + off + e);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) dsum[warp_row] = acc;
}

// Shared memory of both backward kernels: four bf16 tiles (A and B fixed per block, C and D
// streamed), two fp32 [64][68] workspaces (S or P, and dP; together they also stage a
// [64][D + 4] fp32 result at the end), one bf16 [64][72] tile (P, then dS), and the lse and D
// values of up to 64 queries.
template <int D>
struct BwdSmem {
  static constexpr int kLdW = kTile + kFSkew;
  static constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * kTile * (D + kSkew);
  static constexpr size_t kA = 0;
  static constexpr size_t kB = Align128(kA + kTileBytes);
  static constexpr size_t kC = Align128(kB + kTileBytes);
  static constexpr size_t kD = Align128(kC + kTileBytes);
  static constexpr size_t kW = Align128(kD + kTileBytes);  // fp32 [2][64][kLdW]
  static constexpr size_t kP = Align128(kW + sizeof(float) * 2 * kTile * kLdW);
  static constexpr size_t kStats = Align128(kP + sizeof(__nv_bfloat16) * kTile * (kTile + kSkew));
  static constexpr size_t kBytes = Align128(kStats + sizeof(float) * 2 * kTile);
  static_assert(sizeof(float) * kTile * (D + kFSkew) <= sizeof(float) * 2 * kTile * kLdW,
                "the result staging must fit in the two workspaces");
};

// Writes the block's accumulators (each warp 16 rows x D, times `scale`) to global rows
// [row0, row0 + 64) below `rows` (row stride `stride`), staged through fp32 smem `stage`
// ([64][D + kFSkew]). Ends with the block synchronised.
template <int D, typename T>
__device__ void StoreBlockRows(T* dst, size_t stride, int row0, int rows, FragC* acc, float scale,
                               float* stage) {
  constexpr int kLd = D + kFSkew;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // every warp is done with the workspaces the stage overlays
  for (int j = 0; j < D / 16; ++j) {
    for (int e = 0; e < acc[j].num_elements; ++e) acc[j].x[e] *= scale;
    wmma::store_matrix_sync(stage + warp * 16 * kLd + j * 16, acc[j], kLd, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * D; i += kThreads) {
    const int r = i / D, c = i % D;
    if (row0 + r < rows)
      StoreFloat(dst + static_cast<size_t>(row0 + r) * stride + c, stage[r * kLd + c]);
  }
}

// dK, dV for keys [k0, k0 + 64) of KV head kvh in sequence bi: warp w owns keys k0 + 16w ..
// k0 + 16w + 15. For each head of the group, then each query tile at or after the keys:
//   S^T = K Q^T; P^T = exp(scale S^T - lse) (key <= query); dV += P^T dO; dP^T = V dO^T;
//   dS^T = P^T (dP^T - D); dK += scale dS^T Q.
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    FlashBackwardKvKernel(InT* dk, InT* dv, const OutT* dout, const float* lse, const float* dsum,
                          const InT* q, const InT* k, const InT* v, int t, int hq, int hkv,
                          float scale) {
  EE_DYNAMIC_SHARED(smem);
  using L = BwdSmem<D>;
  auto* ks = reinterpret_cast<__nv_bfloat16*>(smem + L::kA);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(smem + L::kB);
  auto* qs = reinterpret_cast<__nv_bfloat16*>(smem + L::kC);
  auto* dos = reinterpret_cast<__nv_bfloat16*>(smem + L::kD);
  auto* work = reinterpret_cast<float*>(smem + L::kW);
  auto* pb = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  auto* stats = reinterpret_cast<float*>(smem + L::kStats);  // lse[64], D[64] of the q tile
  constexpr int kLd = D + kSkew, kLdP = kTile + kSkew, kLdW = L::kLdW;

  const int k0 = blockIdx.x * kTile, kvh = blockIdx.y, bi = blockIdx.z;
  const int group = hq / hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t q_stride = static_cast<size_t>(hq) * D, kv_stride = static_cast<size_t>(hkv) * D;
  const size_t kv_base = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * D;
  LoadTile<D>(ks, k + kv_base, kv_stride, k0, t);
  LoadTile<D>(vs, v + kv_base, kv_stride, k0, t);

  FragC dk_acc[D / 16], dv_acc[D / 16];
  for (int j = 0; j < D / 16; ++j) {
    wmma::fill_fragment(dk_acc[j], 0.0f);
    wmma::fill_fragment(dv_acc[j], 0.0f);
  }
  const int r = lane / 2, half = lane % 2;
  const int key = k0 + warp * 16 + r;               // this lane pair's key
  float* p_w = work + warp * 16 * kLdW;             // P^T rows of this warp (fp32)
  float* dp_w = work + (kTile + warp * 16) * kLdW;  // dP^T rows of this warp (fp32)
  __nv_bfloat16* pb_w = pb + warp * 16 * kLdP;      // P^T, then dS^T (bf16)
  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const size_t q_base = static_cast<size_t>(bi) * t * q_stride + static_cast<size_t>(h) * D;
    const float* lse_h = lse + (static_cast<size_t>(bi) * hq + h) * t;
    const float* dsum_h = dsum + (static_cast<size_t>(bi) * hq + h) * t;
    for (int q0 = k0; q0 < t; q0 += kTile) {  // earlier queries do not see these keys
      __syncthreads();                        // the previous tile's Q/dO/stats reads are done
      LoadTile<D>(qs, q + q_base, q_stride, q0, t);
      LoadTile<D>(dos, dout + q_base, q_stride, q0, t);
      for (int i = threadIdx.x; i < kTile; i += kThreads) {
        const bool in = q0 + i < t;
        stats[i] = in ? lse_h[q0 + i] : 0.0f;
        stats[kTile + i] = in ? dsum_h[q0 + i] : 0.0f;
      }
      __syncthreads();
      WarpProductT<D>(p_w, ks + warp * 16 * kLd, qs);    // S^T_w
      WarpProductT<D>(dp_w, vs + warp * 16 * kLd, dos);  // dP^T_w
      __syncwarp();
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const int query = q0 + c;
        const bool valid = key <= query && query < t && key < t;
        const float p = valid ? __expf(p_w[r * kLdW + c] * scale - stats[c]) : 0.0f;
        p_w[r * kLdW + c] = p;
        pb_w[r * kLdP + c] = __float2bfloat16(p);
      }
      __syncwarp();
      WarpAccumulate<D>(dv_acc, pb_w, dos);  // dV_w += P^T_w dO
      __syncwarp();                          // every lane's P^T reads are done
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const float ds = p_w[r * kLdW + c] * (dp_w[r * kLdW + c] - stats[kTile + c]);
        pb_w[r * kLdP + c] = __float2bfloat16(ds);
      }
      __syncwarp();
      WarpAccumulate<D>(dk_acc, pb_w, qs);  // dK_w += dS^T_w Q
    }
  }
  StoreBlockRows<D>(dv + kv_base, kv_stride, k0, t, dv_acc, 1.0f, work);
  StoreBlockRows<D>(dk + kv_base, kv_stride, k0, t, dk_acc, scale, work);
}

// dQ for queries [q0, q0 + 64) of head h in sequence bi: warp w owns 16 of them. For each key
// tile up to the queries: S = Q K^T; P = exp(scale S - lse); dP = dO V^T; dS = P (dP - D);
// dQ += scale dS K.
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    FlashBackwardQKernel(InT* dq, const OutT* dout, const float* lse, const float* dsum,
                         const InT* q, const InT* k, const InT* v, int t, int hq, int hkv,
                         float scale) {
  EE_DYNAMIC_SHARED(smem);
  using L = BwdSmem<D>;
  auto* qs = reinterpret_cast<__nv_bfloat16*>(smem + L::kA);
  auto* dos = reinterpret_cast<__nv_bfloat16*>(smem + L::kB);
  auto* ks = reinterpret_cast<__nv_bfloat16*>(smem + L::kC);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(smem + L::kD);
  auto* work = reinterpret_cast<float*>(smem + L::kW);
  auto* pb = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  auto* stats = reinterpret_cast<float*>(smem + L::kStats);
  constexpr int kLd = D + kSkew, kLdP = kTile + kSkew, kLdW = L::kLdW;

  const int q0 = blockIdx.x * kTile, h = blockIdx.y, bi = blockIdx.z;
  const int kvh = h / (hq / hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t q_stride = static_cast<size_t>(hq) * D, kv_stride = static_cast<size_t>(hkv) * D;
  const size_t q_base = static_cast<size_t>(bi) * t * q_stride + static_cast<size_t>(h) * D;
  const size_t kv_base = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * D;
  LoadTile<D>(qs, q + q_base, q_stride, q0, t);
  LoadTile<D>(dos, dout + q_base, q_stride, q0, t);
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    const bool in = q0 + i < t;
    const size_t at = (static_cast<size_t>(bi) * hq + h) * t + q0 + i;
    stats[i] = in ? lse[at] : 0.0f;
    stats[kTile + i] = in ? dsum[at] : 0.0f;
  }
  FragC dq_acc[D / 16];
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(dq_acc[j], 0.0f);
  const int r = lane / 2, half = lane % 2;
  const int row = warp * 16 + r, query = q0 + row;
  float* s_w = work + warp * 16 * kLdW;
  float* dp_w = work + (kTile + warp * 16) * kLdW;
  __nv_bfloat16* pb_w = pb + warp * 16 * kLdP;
  const int n_keys = min(t, q0 + kTile);
  for (int k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // the previous tile's K/V reads are done (and Q/dO/stats loaded)
    LoadTile<D>(ks, k + kv_base, kv_stride, k0, t);
    LoadTile<D>(vs, v + kv_base, kv_stride, k0, t);
    __syncthreads();
    WarpProductT<D>(s_w, qs + warp * 16 * kLd, ks);    // S_w
    WarpProductT<D>(dp_w, dos + warp * 16 * kLd, vs);  // dP_w
    __syncwarp();
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int key = k0 + c;
      const bool valid = key <= query && query < t && key < t;
      const float p = valid ? __expf(s_w[r * kLdW + c] * scale - stats[row]) : 0.0f;
      const float ds = p * (dp_w[r * kLdW + c] - stats[kTile + row]);
      pb_w[r * kLdP + c] = __float2bfloat16(ds);
    }
    __syncwarp();
    WarpAccumulate<D>(dq_acc, pb_w, ks);  // dQ_w += dS_w K
  }
  StoreBlockRows<D>(dq + q_base, q_stride, q0, t, dq_acc, scale, work);
}

template <int D, typename InT, typename OutT>
cudaError_t LaunchForward(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int b,
                          int tq, int tk, int tk_cap, int hq, int hkv, int q_offset,
                          cudaStream_t s) {
  constexpr size_t kBytes = FwdSmem<D>::kBytes;
  cudaError_t e = cudaFuncSetAttribute(FlashForwardKernel<D, InT, OutT>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((tq + kTile - 1) / kTile, hq, b);
  return LaunchKernel(FlashForwardKernel<D, InT, OutT>, grid, dim3(kThreads), kBytes, s, out, lse,
                      q, k, v, tq, tk, tk_cap, hq, hkv, q_offset, 1.0f / sqrtf(D));
}

template <int D, typename InT, typename OutT>
cudaError_t LaunchBackward(InT* dq, InT* dk, InT* dv, const OutT* dout, const OutT* out,
                           const float* lse, float* dsum, const InT* q, const InT* k, const InT* v,
                           int b, int t, int hq, int hkv, cudaStream_t s) {
  constexpr size_t kBytes = BwdSmem<D>::kBytes;
  const float scale = 1.0f / sqrtf(D);
  const int rows = b * hq * t;
  cudaError_t e = LaunchKernel(RowDotKernel<OutT>, dim3((rows + 7) / 8), dim3(256), 0, s, dsum,
                               dout, out, t, hq, D, rows);
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(FlashBackwardKvKernel<D, InT, OutT>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(FlashBackwardQKernel<D, InT, OutT>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (e != cudaSuccess) return e;
  const int tiles = (t + kTile - 1) / kTile;
  e = LaunchKernel(FlashBackwardKvKernel<D, InT, OutT>, dim3(tiles, hkv, b), dim3(kThreads), kBytes,
                   s, dk, dv, dout, lse, dsum, q, k, v, t, hq, hkv, scale);
  if (e != cudaSuccess) return e;
  return LaunchKernel(FlashBackwardQKernel<D, InT, OutT>, dim3(tiles, hq, b), dim3(kThreads),
                      kBytes, s, dq, dout, lse, dsum, q, k, v, t, hq, hkv, scale);
}

template <typename InT, typename OutT>
cudaError_t Forward(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int b, int tq,
                    int tk, int tk_cap, int hq, int hkv, int d, int q_offset, cudaStream_t s) {
  if (b == 0 || tq == 0) return cudaSuccess;
  switch (d) {
    case 32:
      return LaunchForward<32>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, s);
    case 64:
      return LaunchForward<64>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, s);
    case 128:
      return LaunchForward<128>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, s);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename InT, typename OutT>
cudaError_t Backward(InT* dq, InT* dk, InT* dv, const OutT* dout, const OutT* out, const float* lse,
                     float* dsum, const InT* q, const InT* k, const InT* v, int b, int t, int hq,
                     int hkv, int d, cudaStream_t s) {
  if (b == 0 || t == 0) return cudaSuccess;
  switch (d) {
    case 32:
      return LaunchBackward<32>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, s);
    case 64:
      return LaunchBackward<64>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, s);
    case 128:
      return LaunchBackward<128>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool FlashAttentionSupports(int d) { return d == 32 || d == 64 || d == 128; }

cudaError_t FlashAttentionForward(Elems out, float* lse, Elems q, Elems k, Elems v, int b, int tq,
                                  int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                                  cudaStream_t s) {
  if (q.bf16 != k.bf16 || q.bf16 != v.bf16) return cudaErrorInvalidValue;
  return WithElementType(out, [&](auto* o) {
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      return Forward(o, lse, qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), b, tq, tk,
                     tk_cap, hq, hkv, d, q_offset, s);
    });
  });
}

cudaError_t FlashAttentionBackward(Elems dq, Elems dk, Elems dv, Elems dout, Elems out,
                                   const float* lse, float* dsum, Elems q, Elems k, Elems v, int b,
                                   int t, int hq, int hkv, int d, cudaStream_t s) {
  for (const Elems& e : {k, v, dq, dk, dv}) {
    if (e.bf16 != q.bf16) return cudaErrorInvalidValue;
  }
  if (dout.bf16 != out.bf16) return cudaErrorInvalidValue;
  return WithElementType(out, [&](auto* o) {
    using OutT = ElementOf<decltype(o)>;
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      return Backward(static_cast<InT*>(dq.data), static_cast<InT*>(dk.data),
                      static_cast<InT*>(dv.data), static_cast<const OutT*>(dout.data), o, lse, dsum,
                      qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), b, t, hq, hkv, d,
                      s);
    });
  });
}

}  // namespace eellm::cuda
