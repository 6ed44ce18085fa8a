// Tokenizer base class, the ByteTokenizer and the MakeTokenizer() factory (which also loads
// tokenizer.json files, and GPT-2's vocab.json + merges.txt, through BpeTokenizer).
#include "models/tokenizer.h"

#include <fstream>
#include <iterator>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "models/bpe_tokenizer.h"
#include "models/gpt2_bpe_files.h"
#include "models/sentencepiece_model.h"
#include "nlohmann/json.hpp"

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

std::vector<std::string> Tokenizer::DecodeShares(absl::Span<const int32_t> ids) const {
  std::vector<std::string> shares;
  shares.reserve(ids.size());
  for (const int32_t& id : ids) shares.push_back(Decode(absl::MakeConstSpan(&id, 1)));
  return shares;
}

std::string ByteTokenizer::DecodeToken(int32_t id) const {
  if (id >= 0 && id < 256) return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
  if (id == kEosId) return "<|endoftext|>";
  if (id == kBosId) return "<|beginoftext|>";
  return "";
}

absl::StatusOr<std::string> TokenizerJson(absl::string_view spec) {
  const std::vector<std::string> files = absl::StrSplit(spec, ',');
  if (files.size() == 2) return Gpt2FilesToTokenizerJson(files[0], files[1]);
  if (files.size() == 1 && absl::EndsWith(spec, ".model")) {
    return SentencePieceFileToTokenizerJson(files[0]);
  }
  if (files.size() != 1 || !absl::EndsWith(spec, ".json")) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown tokenizer \"", spec,
                     "\": expected \"byte\", the path of a tokenizer.json, a SentencePiece "
                     "tokenizer.model, or GPT-2's vocab.json (with merges.txt beside it, or as "
                     "VOCAB.json,MERGES.txt)"));
  }
  std::ifstream f(files[0], std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", files[0]));
  std::string text(std::istreambuf_iterator<char>(f), {});
  // A tokenizer.json has a "model"; GPT-2's vocab.json is a flat {token: id} object.
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_object() && !j.contains("model") && !j.empty() && j.begin()->is_number_integer()) {
    return Gpt2FilesToTokenizerJson(files[0], Gpt2MergesBeside(files[0]));
  }
  return text;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(absl::string_view spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  absl::StatusOr<std::string> json = TokenizerJson(spec);
  if (!json.ok()) return json.status();
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> bpe =
      BpeTokenizer::FromJson(*json, std::string(spec));
  if (!bpe.ok()) return bpe.status();
  return std::unique_ptr<Tokenizer>(std::move(*bpe));
}

}  // namespace eellm
