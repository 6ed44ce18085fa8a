// The embedding gradient on CUDA: dtable[ids[t] - start] += dout[t] for the tokens whose id lies
// in [start, start + rows), each table row's tokens added in token order, in fp32, as the CPU
// backend adds them (the same bits, and deterministic: no atomics). Three steps:
//   1. keys[t] = the token's table row (rows where out of range), order[t] = t;
//   2. CUB's radix sort of (key, t) pairs over the keys' bits: stable, so each row's tokens stay
//      in token order, and the tokens of one row become one run;
//   3. block (i, tile) with i the first position of a run adds the run's dout rows to its
//      columns of the table row; the other blocks return at once.
// Reads dout once and writes each touched table row once: O(n c), where a search for the tokens
// of each row would be O(n^2).
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kernel_launch.h"

namespace eellm::cuda {
namespace {

constexpr int kKeyThreads = 256;
constexpr int kRunThreads = 256;  // columns a block adds (c rounded up to whole warps, at most)

__global__ void EmbeddingKeysKernel(unsigned* keys, int* order, const int32_t* ids, int n,
                                    int start, int rows) {
  const int t = blockIdx.x * kKeyThreads + threadIdx.x;
  if (t >= n) return;
  const int64_t row = static_cast<int64_t>(ids[t]) - start;
  keys[t] = row >= 0 && row < rows ? static_cast<unsigned>(row) : static_cast<unsigned>(rows);
  order[t] = t;
}

// keys sorted, order[i] the token at sorted position i.
__global__ void __launch_bounds__(kRunThreads)
    EmbeddingRunsKernel(float* dtable, const unsigned* keys, const int* order, const float* dout,
                        int n, int c, int rows) {
  const int i = blockIdx.x;
  const unsigned key = keys[i];
  if (key >= static_cast<unsigned>(rows) || (i > 0 && keys[i - 1] == key)) return;
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= c) return;
  float* dst = dtable + static_cast<size_t>(key) * c + j;
  float acc = *dst;
  int u = i;
  // Four tokens' loads in flight at a time (the keys are sorted: keys[u + 3] == key means
  // u .. u + 3 all do), added in order.
  for (; u + 3 < n && keys[u + 3] == key; u += 4) {
    float v[4];
    for (int b = 0; b < 4; ++b) v[b] = dout[static_cast<size_t>(order[u + b]) * c + j];
    for (int b = 0; b < 4; ++b) acc += v[b];
  }
  for (; u < n && keys[u] == key; ++u) acc += dout[static_cast<size_t>(order[u]) * c + j];
  *dst = acc;
}

// Bits that hold the keys 0 .. rows.
int KeyBits(int rows) {
  int bits = 1;
  while (bits < 32 && (uint64_t{1} << bits) <= static_cast<uint64_t>(rows)) ++bits;
  return bits;
}

// The scratch: keys and order, sorted and not (four arrays of ArrayBytes(n), 256-byte aligned),
// then CUB's temporary storage.
size_t ArrayBytes(int n) { return (sizeof(unsigned) * static_cast<size_t>(n) + 255) / 256 * 256; }

}  // namespace

size_t EmbeddingBackwardScratchBytes(int n, int rows) {
  size_t cub_bytes = 0;
  if (n <= 0 || cub::DeviceRadixSort::SortPairs(
                    nullptr, cub_bytes, static_cast<const unsigned*>(nullptr),
                    static_cast<unsigned*>(nullptr), static_cast<const int*>(nullptr),
                    static_cast<int*>(nullptr), n, 0, KeyBits(rows)) != cudaSuccess) {
    return 0;
  }
  return 4 * ArrayBytes(n) + cub_bytes;
}

cudaError_t EmbeddingBackwardRange(float* dtable, const int32_t* ids, const float* dout, int n,
                                   int c, int start, int rows, void* scratch, size_t scratch_bytes,
                                   cudaStream_t s) {
  if (n <= 0 || c <= 0 || rows <= 0) return cudaGetLastError();
  // CUB's storage: what the arrays leave of the scratch (which CUB checks against its needs).
  const size_t array_bytes = ArrayBytes(n);
  if (scratch == nullptr || scratch_bytes <= 4 * array_bytes) return cudaErrorInvalidValue;
  size_t cub_bytes = scratch_bytes - 4 * array_bytes;
  unsigned char* base = static_cast<unsigned char*>(scratch);
  unsigned* keys = reinterpret_cast<unsigned*>(base);
  unsigned* sorted_keys = reinterpret_cast<unsigned*>(base + array_bytes);
  int* order = reinterpret_cast<int*>(base + 2 * array_bytes);
  int* sorted_order = reinterpret_cast<int*>(base + 3 * array_bytes);
  LaunchKernel(EmbeddingKeysKernel, dim3((n + kKeyThreads - 1) / kKeyThreads), dim3(kKeyThreads), 0,
               s, keys, order, ids, n, start, rows);
  const cudaError_t err =
      cub::DeviceRadixSort::SortPairs(base + 4 * array_bytes, cub_bytes, keys, sorted_keys, order,
                                      sorted_order, n, 0, KeyBits(rows), s);
  if (err != cudaSuccess) return err;
  // grid.y = the column tiles: at most 65535, so c up to 16 million.
  const int threads = c < kRunThreads ? (c + 31) / 32 * 32 : kRunThreads;
  const unsigned tiles = static_cast<unsigned>((c + threads - 1) / threads);
  LaunchKernel(EmbeddingRunsKernel, dim3(n, tiles), dim3(threads), 0, s, dtable, sorted_keys,
               sorted_order, dout, n, c, rows);
  return cudaGetLastError();
}

}  // namespace eellm::cuda
