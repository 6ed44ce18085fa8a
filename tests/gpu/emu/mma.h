// Shim for the CUDA emulation in tests: nvcuda::wmma with 16x16x16 fragments. Loads and stores
// are warp-collective instructions that every lane executes together, so each begins at a warp
// barrier here (otherwise a lane's store could overwrite a tile that another lane has yet to
// load). Every lane holds the whole tile (the device spreads it over the warp in an unspecified
// layout, so kernels may only touch fragment elements uniformly, e.g. scale all of them); mma_sync
// multiplies the bf16 operands exactly and accumulates in fp32, as the tensor cores do.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_emulation.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  using Element = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, float, T>;
  Element x[256];  // row-major 16x16 (bf16 operands held as their exact float values)
};

// The device requires 256-bit aligned tile pointers and leading dimensions that are multiples of
// 16 bytes; a violation is undefined behaviour there, so it aborts here.
inline void CheckTile(const void* p, unsigned ld, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * element_bytes) % 16 != 0) {
    std::fprintf(stderr,
                 "CUDA emulation: WMMA tile at %p with leading dimension %u (%zu-byte "
                 "elements): needs 32-byte alignment and a multiple of 16 bytes\n",
                 p, ld, element_bytes);
    std::abort();
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  for (float& e : f.x) e = v;
}

template <typename Use, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p,
                      unsigned ld) {
  CheckTile(p, ld, sizeof(*p));
  eellm_emu::Yield(eellm_emu::Barrier::kCollective);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const __nv_bfloat16 v = std::is_same_v<Layout, row_major> ? p[r * ld + c] : p[c * ld + r];
      f.x[r * 16 + c] = __bfloat162float(v);
    }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  CheckTile(p, ld, sizeof(*p));
  eellm_emu::Yield(eellm_emu::Barrier::kCollective);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      f.x[r * 16 + c] = layout == mem_row_major ? p[r * ld + c] : p[c * ld + r];
    }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  CheckTile(p, ld, sizeof(*p));
  eellm_emu::Yield(eellm_emu::Barrier::kCollective);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float& dst = layout == mem_row_major ? p[r * ld + c] : p[c * ld + r];
      dst = f.x[r * 16 + c];
    }
}

template <typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.x[r * 16 + k] * b.x[k * 16 + n];
      out[r * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace nvcuda::wmma
