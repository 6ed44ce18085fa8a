// Binary token files and the text -> token-file preparation step.
//
// Format (all integers little-endian):
//   bytes 0..7    magic "EELLMTOK"
//   bytes 8..11   uint32 version (1)
//   bytes 12..15  uint32 bytes per token: 2 when the vocabulary has <= 65536 ids, else 4
//   bytes 16..    the tokens, unsigned, `bytes per token` each
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "models/tokenizer.h"

namespace eellm {

inline constexpr char kTokenFileMagic[] = "EELLMTOK";  // 8 bytes on disk, no terminator
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr int kTokenFileHeaderBytes = 16;

// Writes `tokens` (each in [0, vocab_size)) to `path`, creating parent directories. The file
// is written to `path + ".tmp"` and renamed into place, so readers never see a partial file.
absl::Status WriteTokenFile(const std::string& path, absl::Span<const int32_t> tokens,
                            int vocab_size);

// Reads a token file. Errors name the path: NotFound for a missing file, DataLoss for a bad
// magic, an unknown token width or a truncated body, Unimplemented for another version.
absl::StatusOr<std::vector<int32_t>> ReadTokenFile(const std::string& path);

struct DataPrepResult {
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};

// Tokenizes the text file `text_path` with `tok` and writes `out_prefix + ".train.bin"` and
// `out_prefix + ".val.bin"`. A path ending in ".jsonl" is read as JSON lines (Megatron's
// preprocess_data.py input): each line an object whose `json_keys` strings are documents, each
// encoded and followed by the end-of-text id; errors name the line. The validation split is the
// last `val_fraction` (in (0, 0.5]) of the tokens; the cut is moved to the nearest line or
// document start (a token whose predecessor decodes to text ending in '\n', or is the
// end-of-text id) within a small window around the exact point, else made exactly there.
// Concatenating train and val gives the full encoding. Both splits get at least 2 tokens.
absl::StatusOr<DataPrepResult> PrepareTokenData(const std::string& text_path, const Tokenizer& tok,
                                                const std::string& out_prefix, double val_fraction,
                                                const std::vector<std::string>& json_keys = {
                                                    "text"});

}  // namespace eellm
