// DeviceTables: small tables a kernel reads (AdamWRuns' runs, the gradient norm's blocks), built
// on the host from a key (a run list) and uploaded to the device at the key's first use, then
// kept: the optimizer's calls of every step, which pass the same run lists, upload nothing and
// never synchronise. One table per distinct key (a few: one per virtual pipeline chunk); keys
// that change from call to call would allocate every time, so more than kMaxTables is an error.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "engine/cuda/cuda_check.h"

namespace eellm::cuda {

template <typename Key, typename Entry>
class DeviceTables {
 public:
  static constexpr size_t kMaxTables = 256;

  DeviceTables() = default;
  DeviceTables(const DeviceTables&) = delete;
  DeviceTables& operator=(const DeviceTables&) = delete;
  ~DeviceTables() {
    for (Table& t : tables_) cudaFree(t.device);
  }

  // The table for `key`: build(key) (a std::vector<Entry>) uploaded on `stream` the first time.
  template <typename Build>
  const Entry* Get(const std::vector<Key>& key, Build build, cudaStream_t stream) {
    auto known =
        std::find_if(tables_.begin(), tables_.end(), [&](const Table& t) { return t.key == key; });
    if (known != tables_.end()) return known->device;
    EE_CHECK(tables_.size() < kMaxTables, "more than ", kMaxTables,
             " distinct run lists: a caller's runs change from call to call");
    const std::vector<Entry> entries = build(key);
    Table t{key, nullptr};
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&t.device),
                          std::max<size_t>(1, entries.size()) * sizeof(Entry)));
    tables_.push_back(t);  // owned before the copy can fail
    // (A pageable source is staged before cudaMemcpyAsync returns: entries may go.)
    if (!entries.empty()) {
      CUDA_CHECK(cudaMemcpyAsync(t.device, entries.data(), entries.size() * sizeof(Entry),
                                 cudaMemcpyHostToDevice, stream));
    }
    return t.device;
  }

 private:
  struct Table {
    std::vector<Key> key;
    Entry* device = nullptr;
  };
  std::vector<Table> tables_;
};

}  // namespace eellm::cuda
