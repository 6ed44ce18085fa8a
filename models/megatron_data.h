// Megatron-LM's preprocessed datasets, read in place: what tools/preprocess_data.py writes
// (Megatron-Core's IndexedDataset, also EE-LLM's and DeepSpeed's "mmap" format), so a run can
// train on data prepared for Megatron or EE-LLM without converting it.
//
// <prefix>.bin: the tokens of every sequence (document), concatenated, uint16 or int32.
// <prefix>.idx, little-endian: "MMIDIDX\0\0", uint64 version 1, uint8 dtype code (8: uint16,
// 4: int32; the others are not token types), uint64 sequence count S, uint64 document count D,
// int32 sizes[S] (tokens per sequence), int64 pointers[S] (byte offset of each sequence in
// .bin), int64 document_index[D] (the sequence each document starts at, from 0, ending with S;
// D counts that last entry, and an entry repeats for a document without tokens).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "models/token_dataset.h"

namespace eellm {

struct MegatronData {
  TokenDataset tokens;  // every sequence's, in order (a view of the mapped .bin)
  // Token offsets where documents start, strictly ascending from 0 (documents without tokens
  // have none).
  std::vector<int64_t> document_starts;
};

// Whether <prefix>.bin and <prefix>.idx both exist.
bool IsMegatronPrefix(const std::string& prefix);

// Maps <prefix>.bin and checks it against <prefix>.idx: errors name the file and what is wrong
// (bad header, unsupported dtype, sizes and pointers that do not tile .bin in order).
absl::StatusOr<MegatronData> LoadMegatronData(const std::string& prefix);

// Training and validation streams: the validation stream is the last `val_fraction` (in (0, 0.5])
// of the tokens, its start moved back to the start of the document it falls in, and then at least
// one document and never all of them.
absl::StatusOr<std::pair<TokenDataset, TokenDataset>> SplitMegatronData(const MegatronData& data,
                                                                        double val_fraction);

}  // namespace eellm
