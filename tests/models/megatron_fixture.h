// Writes datasets in Megatron-LM's preprocessed format (<prefix>.bin, <prefix>.idx; the layout
// is in models/megatron_data.h), one sequence per document, for the tests that read them.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace eellm::testing {

// The .idx bytes of sequences of these sizes, tokens `width` bytes each (2: dtype code 8, uint16;
// 4: code 4, int32), and the document index (default: a document per sequence, 0 .. S).
inline std::string MegatronIndex(const std::vector<int32_t>& sizes, int width,
                                 std::vector<int64_t> documents = {}) {
  if (documents.empty()) {
    for (int64_t d = 0; d <= static_cast<int64_t>(sizes.size()); ++d) documents.push_back(d);
  }
  std::string idx("MMIDIDX\0\0", 9);
  auto put = [&](const auto& v) { idx.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(uint64_t{1});
  put(static_cast<uint8_t>(width == 2 ? 8 : 4));
  put(static_cast<uint64_t>(sizes.size()));
  put(static_cast<uint64_t>(documents.size()));
  for (int32_t s : sizes) put(s);
  int64_t at = 0;
  for (int32_t s : sizes) {
    put(at);
    at += int64_t{s} * width;
  }
  for (int64_t d : documents) put(d);
  return idx;
}

inline void WriteMegatronDataset(const std::string& prefix,
                                 const std::vector<std::vector<int32_t>>& docs, int width = 2) {
  std::string bin;
  std::vector<int32_t> sizes;
  for (const std::vector<int32_t>& d : docs) {
    sizes.push_back(static_cast<int32_t>(d.size()));
    for (int32_t t : d) {
      if (width == 2) {
        const uint16_t v = static_cast<uint16_t>(t);
        bin.append(reinterpret_cast<const char*>(&v), 2);
      } else {
        bin.append(reinterpret_cast<const char*>(&t), 4);
      }
    }
  }
  std::ofstream(prefix + ".bin", std::ios::binary) << bin;
  std::ofstream(prefix + ".idx", std::ios::binary) << MegatronIndex(sizes, width);
}

}  // namespace eellm::testing
