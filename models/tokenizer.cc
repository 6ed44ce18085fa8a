// Tokenizer base class, the ByteTokenizer and the MakeTokenizer() factory (which also loads
// tokenizer.json files through BpeTokenizer).
#include "models/tokenizer.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "models/bpe_tokenizer.h"

namespace eellm {

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> ByteTokenizer::Encode(absl::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) ids.push_back(static_cast<int32_t>(static_cast<unsigned char>(c)));
  return ids;
}

std::string ByteTokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string text;
  text.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  }
  return text;
}

std::string ByteTokenizer::DecodeToken(int32_t id) const {
  if (id >= 0 && id < 256) return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
  if (id == kEosId) return "<|endoftext|>";
  if (id == kBosId) return "<|beginoftext|>";
  return "";
}

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(absl::string_view spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  if (absl::EndsWith(spec, ".json")) {
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> bpe = BpeTokenizer::Load(std::string(spec));
    if (!bpe.ok()) return bpe.status();
    return std::unique_ptr<Tokenizer>(std::move(*bpe));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown tokenizer \"", spec, "\": expected \"byte\" or the path of a tokenizer.json"));
}

}  // namespace eellm
