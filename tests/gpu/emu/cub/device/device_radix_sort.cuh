// Shim for the CUDA emulation in tests (see cuda_emulation.h): cub::DeviceRadixSort::SortPairs
// for unsigned keys, as CUB defines it (a stable sort of the pairs by bits [begin_bit, end_bit)
// of their keys; a first call with null temporary storage only sets its size), on the host. It
// checks what a GPU would fault or fail on: operands outside device memory, too little
// temporary storage, outputs overlapping inputs, bits out of range.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cuda_emulation.h"

namespace cub {

struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes,
                               const KeyT* d_keys_in, KeyT* d_keys_out, const ValueT* d_values_in,
                               ValueT* d_values_out, NumItemsT num_items, int begin_bit = 0,
                               int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = 0) {
    static_assert(std::is_unsigned_v<KeyT>, "the emulation sorts unsigned keys");
    (void)stream;
    eellm_emu::CompleteWork();
    using eellm_emu::IsDevice;
    using eellm_emu::Misuse;
    const size_t n = static_cast<size_t>(num_items);
    // Some bytes per item, as CUB's passes need: a caller must ask and provide them.
    const size_t needed = 1024 + 4 * n;
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = needed;
      return cudaSuccess;
    }
    if (begin_bit < 0 || end_bit <= begin_bit || end_bit > static_cast<int>(8 * sizeof(KeyT))) {
      return Misuse("SortPairs: bits out of range");
    }
    if (temp_storage_bytes < needed || !IsDevice(d_temp_storage, needed)) {
      return Misuse("SortPairs: temporary storage too small or not device memory");
    }
    if (n == 0) return cudaSuccess;
    const size_t kb = n * sizeof(KeyT), vb = n * sizeof(ValueT);
    if (!IsDevice(d_keys_in, kb) || !IsDevice(d_keys_out, kb) || !IsDevice(d_values_in, vb) ||
        !IsDevice(d_values_out, vb)) {
      return Misuse("SortPairs: an operand is not device memory");
    }
    auto overlaps = [](const void* a, size_t ab, const void* b, size_t bb) {
      const auto* x = static_cast<const unsigned char*>(a);
      const auto* y = static_cast<const unsigned char*>(b);
      return x < y + bb && y < x + ab;
    };
    if (overlaps(d_keys_out, kb, d_keys_in, kb) || overlaps(d_values_out, vb, d_values_in, vb) ||
        overlaps(d_keys_out, kb, d_values_out, vb) ||
        overlaps(d_temp_storage, needed, d_keys_out, kb) ||
        overlaps(d_temp_storage, needed, d_values_out, vb)) {
      return Misuse("SortPairs: outputs overlap inputs or temporary storage");
    }
    const int width = end_bit - begin_bit;
    const KeyT mask = width >= static_cast<int>(8 * sizeof(KeyT))
                          ? static_cast<KeyT>(~KeyT{0})
                          : static_cast<KeyT>((KeyT{1} << width) - 1);
    auto digit = [&](size_t i) { return static_cast<KeyT>((d_keys_in[i] >> begin_bit) & mask); };
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digit(a) < digit(b); });
    for (size_t i = 0; i < n; ++i) {
      d_keys_out[i] = d_keys_in[order[i]];
      d_values_out[i] = d_values_in[order[i]];
    }
    std::memset(d_temp_storage, 0xff, needed);  // used and left as garbage, as by CUB
    return cudaSuccess;
  }
};

}  // namespace cub
