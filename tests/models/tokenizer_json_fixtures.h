// tokenizer.json fixtures shared by the tokenizer tests: GPT-2's bytes_to_unicode() written
// independently of the implementation, a byte-level BPE file (GPT-2 style) and a
// SentencePiece-style BPE file with byte fallback (Llama-2 style).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace eellm::testing {

using nlohmann::json;

inline constexpr char kSpace[] = "\xE2\x96\x81";  // "▁"

// GPT-2's bytes_to_unicode(), written out independently of the implementation.
inline std::string ByteSymbol(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
    int extra = 0;
    for (int k = 0; k < b; ++k) {
      if (!((k >= 33 && k <= 126) || (k >= 161 && k <= 172) || k >= 174)) ++extra;
    }
    cp = 256 + extra;
  }
  if (cp < 0x80) return std::string(1, static_cast<char>(cp));
  return {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
}

// Byte-level fixture: byte b has id b (as its bytes_to_unicode symbol), then the merges below
// (ids 256..261) and two added tokens. Merges mix the "a b" and [a, b] forms.
inline json ByteLevelJson() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteSymbol(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"i", "n"}, {"Ġ", "in"}, {"a", "a"}};
  json merge_list = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    merge_list.push_back(id % 2 == 0 ? json(a + " " + b) : json::array({a, b}));
  }
  json j;
  j["version"] = "1.0";
  j["added_tokens"] = {{{"id", 262}, {"content", "<|endoftext|>"}, {"special", true}},
                       {{"id", 263}, {"content", "[NS]"}, {"special", false}}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", ""},
                {"end_of_word_suffix", ""},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"vocab", vocab},
                {"merges", merge_list}};
  return j;
}

// SentencePiece-style fixture: <unk> <s> </s>, <0x00>..<0xFF> (ids 3..258), then characters and
// merges; Prepend + Replace normalizers as in Llama-2's tokenizer.json.
inline json SentencePieceJson() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) vocab[absl::StrFormat("<0x%02X>", b)] = 3 + b;
  int id = 259;
  for (const std::string c : {kSpace, "h", "e", "l", "o", "w", "r", "d"}) vocab[c] = id++;
  const std::string sp = kSpace;
  json merges = json::array();
  for (const auto& [a, b] : std::vector<std::pair<std::string, std::string>>{
           {"h", "e"}, {"l", "l"}, {sp, "he"}, {"ll", "o"}, {sp + "he", "llo"}, {sp, "w"}}) {
    vocab[a + b] = id++;  // he=267 ll=268 ▁he=269 llo=270 ▁hello=271 ▁w=272
    merges.push_back(a + " " + b);
  }
  json j;
  j["added_tokens"] = {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                       {{"id", 1}, {"content", "<s>"}, {"special", true}},
                       {{"id", 2}, {"content", "</s>"}, {"special", true}}};
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Prepend"}, {"prepend", sp}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", sp}}}}};
  j["pre_tokenizer"] = nullptr;
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", sp}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  j["model"] = {{"type", "BPE"},    {"unk_token", "<unk>"}, {"byte_fallback", true},
                {"fuse_unk", true}, {"vocab", vocab},       {"merges", merges}};
  return j;
}

}  // namespace eellm::testing
