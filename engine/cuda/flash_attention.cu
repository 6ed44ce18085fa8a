// Fused causal attention with grouped-query heads on tensor cores (FlashAttention-2 style):
// bf16 operands, fp32 accumulation, online softmax; no [t, t] tensor is ever stored. Inputs and
// outputs are fp32 or bf16 (see the end of this comment); fp32 tiles are rounded to bf16 as they
// are loaded into shared memory, bf16 ones copied. The products are m16n8k16 MMAs on fragments
// loaded with ldmatrix (warp_mma.cuh); the softmax runs on the accumulators in registers, where
// each lane knows its rows and columns, and the probabilities become the next product's A
// operand without leaving registers. Head dimensions 32, 64 and 128.
//
// Forward: one block per (128 queries, head, sequence); 4 warps of 32 query rows each (two
// groups of 16 sharing every K and V fragment), Q in shared memory; keys in tiles of 32 (the
// registers: 64-key tiles spilled 168 bytes a thread at head dimension 128, 32-key tiles 16). A
// warp's output rows stay in accumulators across the key tiles; the online softmax raises a row's
// reference maximum only when a tile passes it by more than kRescaleSlack, and only then rescales
// that row of O. Backward (deterministic, no atomics): one kernel for dK and dV per (128 keys, KV
// head, sequence; 8 warps of 16 keys) that loops over the heads of its group and the query tiles in
// a fixed order, and one kernel for dQ per (64 queries, head, sequence). Each recomputes P from the
// saved log-sum-exps; D_i = dO_i . O_i comes from a small kernel before them. Every operand is fp32
// or bf16 (engine/tensor/operand.h): q, k, v and dq, dk, dv of one type (InT), O and dO of one type
// (OutT).
//
// Rounding (what the test reference, tests/gpu/bf16_reference_backend.cc, follows): the forward
// rounds P = exp(s - m) to bf16 for the product with V and sums the rounded values; the
// backward rounds P for dV and dS = P (dP - D) for dK and dQ. Products accumulate over the
// head dimension, or over keys (queries) in tile order, in fp32.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine/cuda/async_copy.cuh"
#include "engine/cuda/attention_tiles.cuh"
#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/element_io.cuh"
#include "engine/cuda/kernel_launch.h"
#include "engine/cuda/warp_mma.cuh"

namespace eellm::cuda {
namespace {

// The forward kernel: 4 warps of kFwdGroups x 16 query rows each. Two 16-row groups a warp use
// each K and V fragment loaded from shared memory twice (half the loads a product needs) and give
// the warp two independent softmaxes to interleave; 128 threads of at most 255 registers leave
// room for two blocks an SM, whose barriers do not hold each other.
constexpr int kFwdWarps = 4, kFwdGroups = 2;
constexpr int kFwdKeys = 32;  // keys per tile of the forward
constexpr int kFwdRows = kFwdWarps * kFwdGroups * 16, kFwdThreads = kFwdWarps * 32;
constexpr int kKvWarps = 8;  // of the dK/dV kernel: 16 keys each
constexpr int kKvRows = kKvWarps * 16, kKvThreads = kKvWarps * 32;

// ---- forward ------------------------------------------------------------------------------------

// A row's probabilities are taken against a reference maximum that is raised only when a key
// tile's maximum exceeds it by more than this (natural log units): P then stays below e^8 ~ 3000,
// far from overflow in bf16 and fp32 and with the same relative precision, and O needs
// rescaling only when a row's reference moves.
constexpr float kRescaleSlack = 8.0f;

template <int D>
struct FwdSmem {
  static constexpr size_t kRowBytes = sizeof(__nv_bfloat16) * (D + kSkew);
  static constexpr size_t kQ = 0;                                    // kFwdRows rows
  static constexpr size_t kK = Align128(kQ + kRowBytes * kFwdRows);  // K[0], K[1]: kFwdKeys rows
  static constexpr size_t kV = Align128(kK + 2 * kRowBytes * kFwdKeys);
  static constexpr size_t kBytes = Align128(kV + 2 * kRowBytes * kFwdKeys);
};

// q, out: [b, tq, hq, D]; k, v: [b, tk_cap, hkv, D], or with `pages` (b = 1) the pools of a
// paged KV cache, read through the page table (LoadTile); lse: [b, hq, tq] or null. Rows of q
// lie q_ld elements apart, of k and v kv_ld (the parts of one [n, (hq + 2 hkv) D] buffer, or
// dense); out is dense. InT (q, k, v)
// and OutT: float or __nv_bfloat16. One block per (kFwdRows queries, head, sequence). With
// `segments` (an inference pass over several sequences' paged caches, no lse) sequence z is
// segments[z]: its rows of q and out, its positions and its page table replace tq, q_offset, tk
// and pages, and blocks past its query tiles return at once. Warp w owns rows w R .. w R + R - 1
// (R = 16 kFwdGroups), in groups rg of 16; lane (g, t4) = (lane / 4, lane % 4) holds rows g and
// g + 8 of each group (`half` 0 and 1) and, of each 8-key block, keys 2 t4 and 2 t4 + 1. Q stays
// in shared memory (its fragments are loaded per 16 dimensions). A warp skips the key tiles past
// its last query (all masked: they would add exact zeros) and, whole, rows past tq (decoding:
// tq = 1).
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kFwdThreads, 2)
    FlashForwardKernel(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int tq,
                       int tk, int tk_cap, int hq, int hkv, int q_offset, float scale, int q_ld,
                       int kv_ld, const int32_t* pages, int page_shift,
                       const PagedSegment* segments) {
  EE_DYNAMIC_SHARED(smem);
  using L = FwdSmem<D>;
  __nv_bfloat16* qs = SmemTile<D>(smem, L::kQ);
  constexpr int kLd = D + kSkew, kN = kFwdKeys / 8, kG = kFwdGroups, kWarpRows = 16 * kG;

  int bi = blockIdx.z, tiles = gridDim.x;
  size_t row0 = static_cast<size_t>(bi) * tq;  // the sequence's first row of q and out
  if (segments != nullptr) {
    const PagedSegment sg = segments[blockIdx.z];
    tiles = (sg.rows + kFwdRows - 1) / kFwdRows;
    if (static_cast<int>(blockIdx.x) >= tiles) return;  // (block-uniform, before any barrier)
    tq = sg.rows;
    q_offset = sg.q_offset;
    tk = tk_cap = sg.q_offset + sg.rows;
    pages = sg.pages;
    row0 = sg.row;
    bi = 0;
  }
  // The last query tiles have the most keys: they start first.
  const int q0 = (tiles - 1 - blockIdx.x) * kFwdRows, h = blockIdx.y;
  const int kvh = h / (hq / hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const size_t q_stride = q_ld, kv_stride = kv_ld, o_stride = static_cast<size_t>(hq) * D;
  const InT* qb = q + row0 * q_stride + static_cast<size_t>(h) * D;
  const InT* kb = k + static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * D;
  const InT* vb = v + static_cast<size_t>(bi) * tk_cap * kv_stride + static_cast<size_t>(kvh) * D;

  const int last_q = min(q0 + kFwdRows, tq) - 1;
  const int n_keys = min(tk, q_offset + last_q + 1);
  const int warp_row = warp * kWarpRows;                     // the warp's first row in the tile
  const bool warp_rows = q0 + warp_row < tq;                 // any of the warp's rows exist
  const int warp_first_key = q_offset + q0 + warp_row;       // keys up to it need no mask
  const int warp_last_key = warp_first_key + kWarpRows - 1;  // the last key its rows see
  // K/V tiles in two buffers: tile i + 1 loads while tile i is used.
  auto load_kv = [&](int k0, int buf) {
    if (k0 >= n_keys) return;
    LoadTile<D, InT, kFwdKeys, kFwdThreads>(SmemTile<D, kFwdKeys>(smem, L::kK, buf), kb, kv_stride,
                                            k0, tk, pages, page_shift);
    LoadTile<D, InT, kFwdKeys, kFwdThreads>(SmemTile<D, kFwdKeys>(smem, L::kV, buf), vb, kv_stride,
                                            k0, tk, pages, page_shift);
  };
  LoadTile<D, InT, kFwdRows, kFwdThreads>(qs, qb, q_stride, q0, tq);
  CpAsyncCommit();
  load_kv(0, 0);
  CpAsyncCommit();
  float o[kG][D / 8][4] = {};
  // Per row (group, half): reference maxima of the scaled scores, sums of exp(s - m).
  float m[kG][2], l[kG][2] = {};
#pragma unroll
  for (int rg = 0; rg < kG; ++rg) m[rg][0] = m[rg][1] = -INFINITY;
  const float scale_log2 = scale * kLog2e;

  for (int k0 = 0, buf = 0; k0 < n_keys; k0 += kFwdKeys, buf ^= 1) {
    load_kv(k0 + kFwdKeys, buf ^ 1);  // the other buffer, free since the last iteration's barrier
    CpAsyncCommit();
    CpAsyncWait<1>();  // this tile (and Q, committed before it)
    __syncthreads();
    const __nv_bfloat16* ks = SmemTile<D, kFwdKeys>(smem, L::kK, buf);
    const __nv_bfloat16* vs = SmemTile<D, kFwdKeys>(smem, L::kV, buf);
    if (warp_rows && k0 <= warp_last_key) {  // (warp-uniform)
      // S = Q_w K^T for every group, each K fragment loaded once.
      float s[kG][kN][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[kG][4];
#pragma unroll
        for (int rg = 0; rg < kG; ++rg)
          LdMatrixX4(a[rg], FragRowsA(qs, kLd, warp_row + 16 * rg, kk * 16, lane));
#pragma unroll
        for (int n2 = 0; n2 < kN / 2; ++n2) {
          uint32_t b[4];
          LdMatrixX4(b, FragRowsBt(ks, kLd, n2 * 16, kk * 16, lane));
#pragma unroll
          for (int rg = 0; rg < kG; ++rg) {
            MmaBf16(s[rg][2 * n2], a[rg], b[0], b[1]);
            MmaBf16(s[rg][2 * n2 + 1], a[rg], b[2], b[3]);
          }
        }
      }
      // P_w as A operands: group rg, 8-key block n, row half in p[rg][n / 2][n % 2 * 2 + half].
      uint32_t p[kG][kN / 2][4];
#pragma unroll
      for (int rg = 0; rg < kG; ++rg) {
        // Masks only where the tile reaches past the group's first query or past tk
        // (warp-uniform): the causal diagonal and the end of the keys.
        const int group_first_key = warp_first_key + 16 * rg;
        if (k0 + kFwdKeys - 1 > group_first_key || k0 + kFwdKeys > tk) {
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int key = k0 + n * 8 + 2 * t4 + i % 2;
              if (key > group_first_key + g + 8 * (i / 2) || key >= tk) s[rg][n][i] = -INFINITY;
            }
          }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float tile_max = -INFINITY;  // of the raw scores (scale > 0 keeps the order)
#pragma unroll
          for (int n = 0; n < kN; ++n)
            tile_max = fmaxf(tile_max, fmaxf(s[rg][n][2 * half], s[rg][n][2 * half + 1]));
          // The row's keys of the tile lie in the lanes of one quad.
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
          tile_max *= scale;
          // Raise the reference when the tile's maximum passes it by more than the slack (always
          // at the row's first valid key); O and l, taken against the old reference, shrink by
          // alpha. Before the first valid key O and l are zero, so only later raises rescale O.
          float& mr = m[rg][half];
          if (tile_max > mr + kRescaleSlack) {
            if (mr != -INFINITY) {
              const float alpha = FastExp2((mr - tile_max) * kLog2e);
              l[rg][half] *= alpha;
#pragma unroll
              for (int n = 0; n < D / 8; ++n) {
                o[rg][n][2 * half] *= alpha;
                o[rg][n][2 * half + 1] *= alpha;
              }
            }
            mr = tile_max;
          }
          // P = 2^(s scale log2 e - m log2 e): one FFMA and one ex2 per score, masked scores
          // -inf (0); rounded to bf16 in pairs as the product with V reads them, l summing those
          // values.
          const float neg_m2 = mr == -INFINITY ? 0.0f : -mr * kLog2e;
          float sum = 0.0f;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
            const uint32_t pk =
                PackBf16x2(FastExp2(fmaf(s[rg][n][2 * half], scale_log2, neg_m2)),
                           FastExp2(fmaf(s[rg][n][2 * half + 1], scale_log2, neg_m2)));
            p[rg][n / 2][n % 2 * 2 + half] = pk;
            sum += Bf16x2Lo(pk);
            sum += Bf16x2Hi(pk);
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          l[rg][half] += sum;
        }
      }
      // O_w += P_w V: each V fragment serves every group.
#pragma unroll
      for (int kb2 = 0; kb2 < kN / 2; ++kb2) {
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
          uint32_t b[4];
          LdMatrixX4Trans(b, FragRowsA(vs, kLd, kb2 * 16, n2 * 16, lane));
#pragma unroll
          for (int rg = 0; rg < kG; ++rg) {
            MmaBf16(o[rg][2 * n2], p[rg][kb2], b[0], b[1]);
            MmaBf16(o[rg][2 * n2 + 1], p[rg][kb2], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is loaded again
  }
#pragma unroll
  for (int rg = 0; rg < kG; ++rg) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + warp_row + 16 * rg + g + 8 * half;
      if (row >= tq) continue;  // (also every row of a warp that skipped the loop)
      const float inv = l[rg][half] > 0.0f ? 1.0f / l[rg][half] : 0.0f;
      OutT* orow = out + (row0 + row) * o_stride + static_cast<size_t>(h) * D + 2 * t4;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        StoreFloat(orow + n * 8, o[rg][n][2 * half] * inv);
        StoreFloat(orow + n * 8 + 1, o[rg][n][2 * half + 1] * inv);
      }
      if (lse != nullptr && t4 == 0) {
        lse[(static_cast<size_t>(bi) * hq + h) * tq + row] = m[rg][half] + logf(l[rg][half]);
      }
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

// Shared memory of both backward kernels: two bf16 tiles of FixedRows rows fixed per block (A,
// B), two streamed ones of 64 rows (C, D) in two buffers each, and the lse and D values of up to
// 64 queries, also in two buffers: step i + 1 loads while step i computes.
template <int D, int FixedRows = kTile>
struct BwdSmem {
  static constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * kTile * (D + kSkew);
  static constexpr size_t kFixedBytes = kTileBytes * FixedRows / kTile;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = Align128(kA + kFixedBytes);
  static constexpr size_t kC = Align128(kB + kFixedBytes);
  static constexpr size_t kD = Align128(kC + 2 * kTileBytes);
  static constexpr size_t kStats = Align128(kD + 2 * kTileBytes);  // [2][lse 64, D 64]
  static constexpr size_t kBytes = Align128(kStats + sizeof(float) * 2 * 2 * kTile);
  __device__ static float* Stats(unsigned char* smem, int buf) {
    return reinterpret_cast<float*>(smem + kStats) + buf * 2 * kTile;
  }
};

// The backward kernels take the 64-column tiles in two steps of this many columns (registers).
constexpr int kBwdCols = 32;

// Loads lse (times log2 e, as the kernels' 2^x takes it) and D of queries [q0, q0 + 64) (zeros
// past t) into stats[0, 64) and [64, 128), with the block's Threads threads.
template <int Threads>
__device__ __forceinline__ void LoadStats(float* stats, const float* lse, const float* dsum, int q0,
                                          int t) {
  for (int i = threadIdx.x; i < kTile; i += Threads) {
    const bool in = q0 + i < t;
    stats[i] = in ? lse[q0 + i] * kLog2e : 0.0f;
    stats[kTile + i] = in ? dsum[q0 + i] : 0.0f;
  }
}

// dK, dV for keys [k0, k0 + kKvRows) of KV head kvh in sequence bi (rows of q and dq q_ld apart,
// of k, v, dk and dv kv_ld; out and dout dense): warp w owns keys k0 + 16w ..
// k0 + 16w + 15. For each head of the group, then each query tile at or after the keys:
//   S^T = K Q^T; P^T = exp(scale S^T - lse) (key <= query); dV += P^T dO; dP^T = V dO^T;
//   dS^T = P^T (dP^T - D); dK += scale dS^T Q.
// A warp skips the query tiles that end before its first key (all masked: exact zeros), and
// everything when its keys are past t.
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kKvThreads)
    FlashBackwardKvKernel(InT* dk, InT* dv, const OutT* dout, const float* lse, const float* dsum,
                          const InT* q, const InT* k, const InT* v, int t, int hq, int hkv,
                          float scale, int q_ld, int kv_ld) {
  EE_DYNAMIC_SHARED(smem);
  using L = BwdSmem<D, kKvRows>;
  const __nv_bfloat16* ks = SmemTile<D>(smem, L::kA, 0);
  const __nv_bfloat16* vs = SmemTile<D>(smem, L::kB, 0);
  constexpr int kN = kBwdCols / 8;

  const int k0 = blockIdx.x * kKvRows, kvh = blockIdx.y, bi = blockIdx.z;
  const int group = hq / hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const size_t q_stride = q_ld, kv_stride = kv_ld, o_stride = static_cast<size_t>(hq) * D;
  const size_t kv_base = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * D;
  // Steps: (head of the group, query tile at or after the keys; earlier queries do not see
  // them), heads outer.
  const int q_tiles = (t - k0 + kTile - 1) / kTile, steps = group * q_tiles;
  auto load_step = [&](int step, int buf) {
    if (step >= steps) return;
    const int h = kvh * group + step / q_tiles, q0 = k0 + (step % q_tiles) * kTile;
    const size_t q_base = static_cast<size_t>(bi) * t * q_stride + static_cast<size_t>(h) * D;
    const size_t o_base = static_cast<size_t>(bi) * t * o_stride + static_cast<size_t>(h) * D;
    LoadTile<D, InT, kTile, kKvThreads>(SmemTile<D>(smem, L::kC, buf), q + q_base, q_stride, q0, t);
    LoadTile<D, OutT, kTile, kKvThreads>(SmemTile<D>(smem, L::kD, buf), dout + o_base, o_stride, q0,
                                         t);
    const size_t row = (static_cast<size_t>(bi) * hq + h) * t;
    LoadStats<kKvThreads>(L::Stats(smem, buf), lse + row, dsum + row, q0, t);
  };
  LoadTile<D, InT, kKvRows, kKvThreads>(SmemTile<D>(smem, L::kA, 0), k + kv_base, kv_stride, k0, t);
  LoadTile<D, InT, kKvRows, kKvThreads>(SmemTile<D>(smem, L::kB, 0), v + kv_base, kv_stride, k0, t);
  load_step(0, 0);
  CpAsyncCommit();

  float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
  const int key0 = k0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8
  const int warp_key = k0 + warp * 16;  // the warp's first key
  const float scale_log2 = scale * kLog2e;
  for (int step = 0, buf = 0; step < steps; ++step, buf ^= 1) {
    load_step(step + 1, buf ^ 1);  // the other buffers, free since the last step's barrier
    CpAsyncCommit();
    CpAsyncWait<1>();  // this step's tiles
    __syncthreads();
    const int q0 = k0 + (step % q_tiles) * kTile;
    const __nv_bfloat16* qs = SmemTile<D>(smem, L::kC, buf);
    const __nv_bfloat16* dos = SmemTile<D>(smem, L::kD, buf);
    const float* stats = L::Stats(smem, buf);
    const bool work = warp_key < t && q0 + kTile - 1 >= warp_key;  // (warp-uniform)
    for (int c0 = 0; work && c0 < kTile; c0 += kBwdCols) {
      float pt[kN][4] = {}, dst[kN][4] = {};
      ProductXYt<D, kBwdCols>(pt, ks, warp * 16, qs, c0, lane);    // S^T_w
      ProductXYt<D, kBwdCols>(dst, vs, warp * 16, dos, c0, lane);  // dP^T_w
      // Masks only where a query precedes one of the warp's keys or rows run past t
      // (warp-uniform): the causal diagonal and the ends.
      const bool masked = q0 + c0 < warp_key + 15 || q0 + c0 + kBwdCols > t || warp_key + 16 > t;
      for (int n = 0; n < kN; ++n) {
        for (int half = 0; half < 2; ++half) {
          for (int e = 0; e < 2; ++e) {
            const int col = c0 + n * 8 + 2 * t4 + e, query = q0 + col, key = key0 + 8 * half;
            float& p = pt[n][2 * half + e];
            p = FastExp2(fmaf(p, scale_log2, -stats[col]));  // exp(s scale - lse)
            if (masked && !(key <= query && query < t && key < t)) p = 0.0f;
            float& ds = dst[n][2 * half + e];
            ds = p * (ds - stats[kTile + col]);
          }
        }
      }
      uint32_t pa[kN / 2][4], dsa[kN / 2][4];
      for (int kb = 0; kb < kN / 2; ++kb) {
        AccumulatorsAsA(pa[kb], pt[2 * kb], pt[2 * kb + 1]);
        AccumulatorsAsA(dsa[kb], dst[2 * kb], dst[2 * kb + 1]);
      }
      AccumulatePY<D, kN / 2>(dv_acc, pa, dos, c0, lane);  // dV_w += P^T_w dO
      AccumulatePY<D, kN / 2>(dk_acc, dsa, qs, c0, lane);  // dK_w += dS^T_w Q
    }
    __syncthreads();  // every warp is done with these buffers before they are loaded again
  }
  StoreWarpRows<D>(dv + kv_base, kv_stride, warp_key, t, dv_acc, 1.0f, lane);
  StoreWarpRows<D>(dk + kv_base, kv_stride, warp_key, t, dk_acc, scale, lane);
}

// dQ for queries [q0, q0 + 64) of head h in sequence bi (layouts as the dK, dV kernel's): warp w
// owns 16 of them. For each key
// tile up to the queries: S = Q K^T; P = exp(scale S - lse); dP = dO V^T; dS = P (dP - D);
// dQ += scale dS K.
template <int D, typename InT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    FlashBackwardQKernel(InT* dq, const OutT* dout, const float* lse, const float* dsum,
                         const InT* q, const InT* k, const InT* v, int t, int hq, int hkv,
                         float scale, int q_ld, int kv_ld) {
  EE_DYNAMIC_SHARED(smem);
  using L = BwdSmem<D>;
  const __nv_bfloat16* qs = SmemTile<D>(smem, L::kA, 0);
  const __nv_bfloat16* dos = SmemTile<D>(smem, L::kB, 0);
  const float* stats = L::Stats(smem, 0);
  constexpr int kN = kBwdCols / 8;

  // The last query tiles have the most keys: they start first.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile, h = blockIdx.y, bi = blockIdx.z;
  const int kvh = h / (hq / hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const size_t q_stride = q_ld, kv_stride = kv_ld, o_stride = static_cast<size_t>(hq) * D;
  const size_t q_base = static_cast<size_t>(bi) * t * q_stride + static_cast<size_t>(h) * D;
  const size_t o_base = static_cast<size_t>(bi) * t * o_stride + static_cast<size_t>(h) * D;
  const size_t kv_base = static_cast<size_t>(bi) * t * kv_stride + static_cast<size_t>(kvh) * D;
  const int n_keys = min(t, q0 + kTile);
  auto load_kv = [&](int k0, int buf) {
    if (k0 >= n_keys) return;
    LoadTile<D>(SmemTile<D>(smem, L::kC, buf), k + kv_base, kv_stride, k0, t);
    LoadTile<D>(SmemTile<D>(smem, L::kD, buf), v + kv_base, kv_stride, k0, t);
  };
  LoadTile<D>(SmemTile<D>(smem, L::kA, 0), q + q_base, q_stride, q0, t);
  LoadTile<D>(SmemTile<D>(smem, L::kB, 0), dout + o_base, o_stride, q0, t);
  const size_t row = (static_cast<size_t>(bi) * hq + h) * t;
  LoadStats<kThreads>(L::Stats(smem, 0), lse + row, dsum + row, q0, t);
  load_kv(0, 0);
  CpAsyncCommit();

  float dq_acc[D / 8][4] = {};
  const int row0 = warp * 16 + g;     // this lane's rows in the tile: row0 and row0 + 8
  const int warp_q = q0 + warp * 16;  // the warp's first query
  const float scale_log2 = scale * kLog2e;
  float row_lse[2], row_d[2];  // lse log2 e and D of the lane's rows, read after the first wait
  for (int k0 = 0, buf = 0; k0 < n_keys; k0 += kTile, buf ^= 1) {
    load_kv(k0 + kTile, buf ^ 1);  // the other buffers, free since the last tile's barrier
    CpAsyncCommit();
    CpAsyncWait<1>();  // this tile (and Q, dO)
    __syncthreads();
    const __nv_bfloat16* ks = SmemTile<D>(smem, L::kC, buf);
    const __nv_bfloat16* vs = SmemTile<D>(smem, L::kD, buf);
    if (k0 == 0) {
      for (int half = 0; half < 2; ++half) {
        row_lse[half] = stats[row0 + 8 * half];
        row_d[half] = stats[kTile + row0 + 8 * half];
      }
    }
    for (int c0 = 0; c0 < kTile; c0 += kBwdCols) {
      float s[kN][4] = {}, ds[kN][4] = {};
      ProductXYt<D, kBwdCols>(s, qs, warp * 16, ks, c0, lane);    // S_w
      ProductXYt<D, kBwdCols>(ds, dos, warp * 16, vs, c0, lane);  // dP_w
      // Masks only where a key follows one of the warp's queries or rows run past t
      // (warp-uniform): the causal diagonal and the ends.
      const bool masked =
          k0 + c0 + kBwdCols - 1 > warp_q || k0 + c0 + kBwdCols > t || warp_q + 16 > t;
      for (int n = 0; n < kN; ++n) {
        for (int half = 0; half < 2; ++half) {
          const int query = q0 + row0 + 8 * half;
          for (int e = 0; e < 2; ++e) {
            const int key = k0 + c0 + n * 8 + 2 * t4 + e;
            float p = FastExp2(fmaf(s[n][2 * half + e], scale_log2, -row_lse[half]));
            if (masked && !(key <= query && query < t && key < t)) p = 0.0f;
            float& x = ds[n][2 * half + e];
            x = p * (x - row_d[half]);
          }
        }
      }
      uint32_t dsa[kN / 2][4];
      for (int kb = 0; kb < kN / 2; ++kb) AccumulatorsAsA(dsa[kb], ds[2 * kb], ds[2 * kb + 1]);
      AccumulatePY<D, kN / 2>(dq_acc, dsa, ks, c0, lane);  // dQ_w += dS_w K
    }
    __syncthreads();  // every warp is done with these buffers before they are loaded again
  }
  StoreWarpRows<D>(dq + q_base, q_stride, q0 + warp * 16, t, dq_acc, scale, lane);
}

template <int D, typename InT, typename OutT>
cudaError_t LaunchForward(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int b,
                          int tq, int tk, int tk_cap, int hq, int hkv, int q_offset, int q_ld,
                          int kv_ld, cudaStream_t s, const int32_t* pages, int page_shift,
                          const PagedSegment* segments) {
  constexpr size_t kBytes = FwdSmem<D>::kBytes;
  static const cudaError_t e = cudaFuncSetAttribute(
      FlashForwardKernel<D, InT, OutT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((tq + kFwdRows - 1) / kFwdRows, hq, b);
  return LaunchKernel(FlashForwardKernel<D, InT, OutT>, grid, dim3(kFwdThreads), kBytes, s, out,
                      lse, q, k, v, tq, tk, tk_cap, hq, hkv, q_offset, 1.0f / sqrtf(D), q_ld, kv_ld,
                      pages, page_shift, segments);
}

template <int D, typename InT, typename OutT>
cudaError_t LaunchBackward(InT* dq, InT* dk, InT* dv, const OutT* dout, const OutT* out,
                           const float* lse, float* dsum, const InT* q, const InT* k, const InT* v,
                           int b, int t, int hq, int hkv, int q_ld, int kv_ld, cudaStream_t s) {
  constexpr size_t kKvBytes = BwdSmem<D, kKvRows>::kBytes, kQBytes = BwdSmem<D>::kBytes;
  const float scale = 1.0f / sqrtf(D);
  const int rows = b * hq * t;
  cudaError_t e = LaunchKernel(RowDotKernel<OutT>, dim3((rows + 7) / 8), dim3(256), 0, s, dsum,
                               dout, out, t, hq, D, rows);
  if (e != cudaSuccess) return e;
  static const cudaError_t allowed_kv = cudaFuncSetAttribute(
      FlashBackwardKvKernel<D, InT, OutT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kKvBytes);
  if (allowed_kv != cudaSuccess) return allowed_kv;
  static const cudaError_t allowed_q = cudaFuncSetAttribute(
      FlashBackwardQKernel<D, InT, OutT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kQBytes);
  if (allowed_q != cudaSuccess) return allowed_q;
  e = LaunchKernel(FlashBackwardKvKernel<D, InT, OutT>, dim3((t + kKvRows - 1) / kKvRows, hkv, b),
                   dim3(kKvThreads), kKvBytes, s, dk, dv, dout, lse, dsum, q, k, v, t, hq, hkv,
                   scale, q_ld, kv_ld);
  if (e != cudaSuccess) return e;
  return LaunchKernel(FlashBackwardQKernel<D, InT, OutT>, dim3((t + kTile - 1) / kTile, hq, b),
                      dim3(kThreads), kQBytes, s, dq, dout, lse, dsum, q, k, v, t, hq, hkv, scale,
                      q_ld, kv_ld);
}

template <typename InT, typename OutT>
cudaError_t Forward(OutT* out, float* lse, const InT* q, const InT* k, const InT* v, int b, int tq,
                    int tk, int tk_cap, int hq, int hkv, int d, int q_offset, int q_ld, int kv_ld,
                    cudaStream_t s, const int32_t* pages = nullptr, int page_shift = 0,
                    const PagedSegment* segments = nullptr) {
  if (b == 0 || tq == 0) return cudaSuccess;
  switch (d) {
    case 32:
      return LaunchForward<32>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, q_ld, kv_ld,
                               s, pages, page_shift, segments);
    case 64:
      return LaunchForward<64>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, q_ld, kv_ld,
                               s, pages, page_shift, segments);
    case 128:
      return LaunchForward<128>(out, lse, q, k, v, b, tq, tk, tk_cap, hq, hkv, q_offset, q_ld,
                                kv_ld, s, pages, page_shift, segments);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename InT, typename OutT>
cudaError_t Backward(InT* dq, InT* dk, InT* dv, const OutT* dout, const OutT* out, const float* lse,
                     float* dsum, const InT* q, const InT* k, const InT* v, int b, int t, int hq,
                     int hkv, int d, int q_ld, int kv_ld, cudaStream_t s) {
  if (b == 0 || t == 0) return cudaSuccess;
  switch (d) {
    case 32:
      return LaunchBackward<32>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, q_ld,
                                kv_ld, s);
    case 64:
      return LaunchBackward<64>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, q_ld,
                                kv_ld, s);
    case 128:
      return LaunchBackward<128>(dq, dk, dv, dout, out, lse, dsum, q, k, v, b, t, hq, hkv, q_ld,
                                 kv_ld, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool FlashAttentionSupports(int d) { return d == 32 || d == 64 || d == 128; }

cudaError_t FlashAttentionForward(Elems out, float* lse, Elems q, Elems k, Elems v, int b, int tq,
                                  int tk, int tk_cap, int hq, int hkv, int d, int q_offset,
                                  int q_ld, int kv_ld, cudaStream_t s) {
  if (q.bf16 != k.bf16 || q.bf16 != v.bf16) return cudaErrorInvalidValue;
  return WithElementType(out, [&](auto* o) {
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      return Forward(o, lse, qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), b, tq, tk,
                     tk_cap, hq, hkv, d, q_offset, q_ld, kv_ld, s);
    });
  });
}

cudaError_t FlashAttentionForwardSegments(Elems out, Elems q, Elems k, Elems v,
                                          const PagedSegment* segments, int count, int max_rows,
                                          int page_tokens, int hq, int hkv, int d, int q_ld,
                                          cudaStream_t s) {
  const int shift = PageShift(page_tokens);
  if (q.bf16 != k.bf16 || q.bf16 != v.bf16 || shift < 0) return cudaErrorInvalidValue;
  return WithElementType(out, [&](auto* o) {
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      // b = count and tq = max_rows size the grid; each block reads its segment's sizes.
      return Forward(o, nullptr, qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), count,
                     max_rows, 0, 0, hq, hkv, d, 0, q_ld, hkv * d, s, nullptr, shift, segments);
    });
  });
}

cudaError_t FlashAttentionForwardPaged(Elems out, Elems q, Elems k, Elems v, const int32_t* pages,
                                       int page_tokens, int tq, int hq, int hkv, int d,
                                       int q_offset, int q_ld, cudaStream_t s) {
  const int shift = PageShift(page_tokens);
  if (q.bf16 != k.bf16 || q.bf16 != v.bf16 || shift < 0) return cudaErrorInvalidValue;
  const int tk = q_offset + tq;
  return WithElementType(out, [&](auto* o) {
    return WithElementType(q, [&](auto* qp) {
      using InT = ElementOf<decltype(qp)>;
      return Forward(o, nullptr, qp, static_cast<InT*>(k.data), static_cast<InT*>(v.data), 1, tq,
                     tk, tk, hq, hkv, d, q_offset, q_ld, hkv * d, s, pages, shift);
    });
  });
}

cudaError_t FlashAttentionBackward(Elems dq, Elems dk, Elems dv, Elems dout, Elems out,
                                   const float* lse, float* dsum, Elems q, Elems k, Elems v, int b,
                                   int t, int hq, int hkv, int d, int q_ld, int kv_ld,
                                   cudaStream_t s) {
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
                      q_ld, kv_ld, s);
    });
  });
}

}  // namespace eellm::cuda
