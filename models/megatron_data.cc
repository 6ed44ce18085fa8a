#include "models/megatron_data.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "models/mapped_file.h"

namespace eellm {
namespace {

constexpr char kIdxMagic[] = "MMIDIDX\0\0";  // 9 bytes
constexpr size_t kIdxHeaderBytes = 9 + 8 + 1 + 8 + 8;

template <typename T>
T Get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

bool IsMegatronPrefix(const std::string& prefix) {
  std::error_code ec;
  return std::filesystem::is_regular_file(prefix + ".bin", ec) &&
         std::filesystem::is_regular_file(prefix + ".idx", ec);
}

absl::StatusOr<MegatronData> LoadMegatronData(const std::string& prefix) {
  const std::string idx_path = prefix + ".idx", bin_path = prefix + ".bin";
  ASSIGN_OR_RETURN(auto idx, MappedFile::Open(idx_path));
  ASSIGN_OR_RETURN(auto bin, MappedFile::Open(bin_path));
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("Megatron index ", idx_path, ": ", what));
  };
  const uint8_t* p = idx->data();
  if (idx->size() < kIdxHeaderBytes || std::memcmp(p, kIdxMagic, 9) != 0) {
    return bad("not a Megatron indexed dataset (no \"MMIDIDX\" header)");
  }
  const uint64_t version = Get<uint64_t>(p + 9);
  if (version != 1) return bad(absl::StrCat("version ", version, "; this build reads version 1"));
  const int code = p[17];
  const int width = code == 8 ? 2 : code == 4 ? 4 : 0;
  if (width == 0) {
    return bad(absl::StrCat("dtype code ", code,
                            " is not a token type this build reads (8: uint16, 4: int32)"));
  }
  const uint64_t sequences = Get<uint64_t>(p + 18), documents = Get<uint64_t>(p + 26);
  const uint64_t want = kIdxHeaderBytes + sequences * (4 + 8) + documents * 8;
  if (sequences > (uint64_t{1} << 40) || documents > (uint64_t{1} << 40) || idx->size() < want) {
    return bad(absl::StrCat(sequences, " sequences and ", documents, " documents need ", want,
                            " bytes, the file has ", idx->size()));
  }
  const uint8_t* sizes = p + kIdxHeaderBytes;
  const uint8_t* pointers = sizes + sequences * 4;
  const uint8_t* doc_index = pointers + sequences * 8;
  // The sequences must tile .bin in order: the tokens are then one stream.
  int64_t tokens = 0;
  for (uint64_t s = 0; s < sequences; ++s) {
    const int32_t n = Get<int32_t>(sizes + 4 * s);
    const int64_t at = Get<int64_t>(pointers + 8 * s);
    if (n < 0 || at != tokens * width) {
      return bad(absl::StrCat("sequence ", s, " (", n, " tokens at byte ", at,
                              ") does not follow the one before it in ", bin_path,
                              " (expected byte ", tokens * width, ")"));
    }
    tokens += n;
    if (static_cast<uint64_t>(tokens) * width > bin->size()) {
      return bad(absl::StrCat("sequence ", s, " ends at byte ", tokens * width,
                              ", past the end of ", bin_path, " (", bin->size(), " bytes)"));
    }
  }
  if (static_cast<uint64_t>(tokens) * width != bin->size()) {
    return bad(absl::StrCat("the sequences hold ", tokens, " tokens (", tokens * width,
                            " bytes), but ", bin_path, " has ", bin->size(), " bytes"));
  }
  MegatronData data;
  int64_t previous = -1, sequence_start = 0;
  uint64_t next_sequence = 0;  // walks the sizes to turn sequence indices into token offsets
  for (uint64_t d = 0; d < documents; ++d) {
    const int64_t s = Get<int64_t>(doc_index + 8 * d);
    // Megatron's builder repeats an entry for a document that tokenized to nothing.
    if (s < previous || s < 0 || static_cast<uint64_t>(s) > sequences || (d == 0 && s != 0)) {
      return bad(absl::StrCat("document_index[", d, "] = ", s, " is not non-decreasing from 0 to ",
                              sequences));
    }
    previous = s;
    for (; next_sequence < static_cast<uint64_t>(s); ++next_sequence) {
      sequence_start += Get<int32_t>(sizes + 4 * next_sequence);
    }
    // Documents without tokens start nowhere: each start is a token, once.
    if (sequence_start < tokens &&
        (data.document_starts.empty() || sequence_start > data.document_starts.back())) {
      data.document_starts.push_back(sequence_start);
    }
  }
  if (data.document_starts.empty() && tokens > 0) data.document_starts.push_back(0);
  data.tokens = TokenDataset(bin, bin->data(), width, tokens);
  return data;
}

absl::StatusOr<std::pair<TokenDataset, TokenDataset>> SplitMegatronData(const MegatronData& data,
                                                                        double val_fraction) {
  if (!(val_fraction > 0 && val_fraction <= 0.5)) {
    return absl::InvalidArgumentError(
        absl::StrCat("val_fraction must be in (0, 0.5], got ", val_fraction));
  }
  const std::vector<int64_t>& starts = data.document_starts;
  if (starts.size() < 2) {
    return absl::FailedPreconditionError(
        absl::StrCat("Megatron data of ", starts.size(),
                     " documents: at least 2 are needed to hold one out for validation"));
  }
  const int64_t n = data.tokens.size();
  const int64_t target = n - static_cast<int64_t>(val_fraction * static_cast<double>(n));
  // The document that holds token `target` starts the validation stream, but never the first.
  auto it = std::upper_bound(starts.begin(), starts.end(), target);
  int64_t cut = *std::prev(it);
  if (cut == 0) cut = starts[1];
  return std::make_pair(data.tokens.Slice(0, cut), data.tokens.Slice(cut, n));
}

}  // namespace eellm
