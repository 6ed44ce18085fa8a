#include "models/gpt2_bpe_files.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace eellm {

namespace {

absl::StatusOr<std::string> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  return std::string(std::istreambuf_iterator<char>(f), {});
}

}  // namespace

std::string Gpt2MergesBeside(const std::string& vocab_path) {
  const std::filesystem::path p(vocab_path);
  std::string name = p.filename().string();
  const size_t at = name.rfind("vocab");
  if (at != std::string::npos) name.replace(at, 5, "merges");
  if (absl::EndsWith(name, ".json")) name = name.substr(0, name.size() - 5) + ".txt";
  return (p.parent_path() / name).string();
}

absl::StatusOr<std::string> Gpt2FilesToTokenizerJson(const std::string& vocab_path,
                                                     const std::string& merges_path) {
  auto vocab_text = ReadAll(vocab_path);
  if (!vocab_text.ok()) return vocab_text.status();
  nlohmann::json vocab = nlohmann::json::parse(*vocab_text, nullptr, false);
  if (vocab.is_discarded() || !vocab.is_object() || vocab.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(vocab_path, " is not a GPT-2 vocab.json (a JSON object of token: id)"));
  }
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": token \"", token.substr(0, 40),
                                                     "\" has id ", id.dump().substr(0, 40),
                                                     ", expected a non-negative integer"));
    }
  }
  auto merges_text = ReadAll(merges_path);
  if (!merges_text.ok()) {
    return absl::NotFoundError(
        absl::StrCat("cannot open ", merges_path, " (the merges of ", vocab_path, ")"));
  }
  nlohmann::json merges = nlohmann::json::array();
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(*merges_text, '\n')) {
    ++line_no;
    line = absl::StripSuffix(line, "\r");
    if (line.empty() || (line_no == 1 && absl::StartsWith(line, "#version"))) continue;
    const std::vector<absl::string_view> pair = absl::StrSplit(line, ' ');
    if (pair.size() != 2 || pair[0].empty() || pair[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(merges_path, " line ", line_no, ": \"",
                                                     line.substr(0, 60),
                                                     "\" is not two symbols separated by a space"));
    }
    merges.push_back(std::string(line));
  }
  nlohmann::json j;
  j["version"] = "1.0";
  j["added_tokens"] = nlohmann::json::array();
  if (vocab.contains("<|endoftext|>")) {
    j["added_tokens"].push_back(
        {{"id", vocab["<|endoftext|>"]}, {"content", "<|endoftext|>"}, {"special", true}});
  }
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  j["model"] = {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", std::move(merges)}};
  return j.dump();
}

}  // namespace eellm
