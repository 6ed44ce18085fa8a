// Fuzz tests for the tokenizer.json loader BpeTokenizer::FromJson: random bytes, and byte edits,
// truncations, JSON-token edits (delete, duplicate, swap, replace) and structural edits (a node
// removed or replaced by a value of another type) of small valid files in four flavours (GPT-2
// byte-level, Llama-3 split + byte-level, SentencePiece-style with normalizers, Metaspace) must
// never crash. Whatever loads must encode random text to ids in [0, vocab_size) and decode any
// ids; the unmutated byte-level files must round-trip ASCII and arbitrary bytes exactly.
// EELLM_FUZZ_ITERATIONS and EELLM_FUZZ_SEED in the environment override the loop's defaults.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "models/bpe_tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz_env.h"
#include "tests/models/tokenizer_json_fixtures.h"

namespace eellm {
namespace {

using testing::FuzzIterations;
using testing::FuzzSeed;

using nlohmann::json;

using testing::kSpace;
using testing::SentencePieceJson;

// GPT-2 style: the shared byte-level fixture with a post-processor and null optional fields.
json Gpt2Json() {
  json j = testing::ByteLevelJson();
  j["post_processor"] = {{"type", "ByteLevel"}, {"trim_offsets", true}};
  j["model"]["continuing_subword_prefix"] = nullptr;
  j["model"]["end_of_word_suffix"] = nullptr;
  return j;
}

// Llama-3 style: a Split (cl100k regex) + ByteLevel sequence and ignore_merges.
json Llama3Json() {
  json j = Gpt2Json();
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex", R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
                     R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"},
         {"add_prefix_space", false},
         {"trim_offsets", true},
         {"use_regex", false}}}}};
  j["model"]["ignore_merges"] = true;
  j["added_tokens"] = {{{"id", 500}, {"content", "<|begin_of_text|>"}, {"special", true}},
                       {{"id", 501}, {"content", "<|end_of_text|>"}, {"special", true}}};
  return j;
}

// SentencePiece style with a Metaspace pre-tokenizer instead of the normalizers.
json MetaspaceJson() {
  json j = SentencePieceJson();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "first"}, {"split", true}};
  return j;
}

std::vector<std::string> ValidTexts() {
  return {Gpt2Json().dump(), Llama3Json().dump(), SentencePieceJson().dump(),
          MetaspaceJson().dump(2)};
}

// Splits JSON text into tokens: strings, numbers/literals, punctuation and whitespace runs
// (a broken input still splits, into whatever these rules make of it).
std::vector<std::string> JsonTokens(const std::string& text) {
  std::vector<std::string> tokens;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i + 1;
    const char c = text[i];
    if (c == '"') {
      while (j < text.size() && text[j] != '"') j += text[j] == '\\' ? 2 : 1;
      j = std::min(j + 1, text.size());
    } else if (c == ' ' || c == '\n') {
      while (j < text.size() && (text[j] == ' ' || text[j] == '\n')) ++j;
    } else if (std::string("{}[],:").find(c) == std::string::npos) {
      while (j < text.size() && std::string("{}[],:\" \n").find(text[j]) == std::string::npos) ++j;
    }
    tokens.push_back(text.substr(i, j - i));
    i = j;
  }
  return tokens;
}

// All JSON pointers into `j` (the root excluded).
void CollectPointers(const json& j, const json::json_pointer& at,
                     std::vector<json::json_pointer>* out) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) {
      out->push_back(at / k);
      CollectPointers(v, at / k, out);
    }
  } else if (j.is_array()) {
    for (size_t i = 0; i < j.size(); ++i) {
      out->push_back(at / i);
      CollectPointers(j[i], at / i, out);
    }
  }
}

// Removes the node at `p` or replaces it with a value of a random other kind.
void MutateStructure(json* j, std::mt19937* rng) {
  std::vector<json::json_pointer> pointers;
  CollectPointers(*j, json::json_pointer(), &pointers);
  if (pointers.empty()) return;
  // Favour the small, structural parts over the 256+ vocab entries half of the time.
  json::json_pointer p = pointers[(*rng)() % pointers.size()];
  if ((*rng)() % 2 == 0) {
    for (int tries = 0; tries < 8 && p.to_string().find("/vocab/") != std::string::npos; ++tries) {
      p = pointers[(*rng)() % pointers.size()];
    }
  }
  const json palette[] = {nullptr,
                          true,
                          false,
                          0,
                          -1,
                          2,
                          256,
                          (1 << 21) - 1,
                          1 << 21,
                          int64_t{1} << 40,
                          -0.5,
                          1e300,
                          "",
                          " ",
                          "a b",
                          "Ġ",
                          kSpace,
                          "<s>",
                          "<0xZZ>",
                          "ByteLevel",
                          "Sequence",
                          "Split",
                          "BPE",
                          json::array(),
                          json::object(),
                          json::array({"h", "e"}),
                          json::array({"", ""}),
                          {{"type", "Metaspace"}},
                          {{"String", ""}},
                          {{"Regex", "("}},
                          {{"id", 3}, {"content", ""}, {"special", true}}};
  const json::json_pointer parent = p.parent_pointer();
  const std::string last = p.back();
  switch ((*rng)() % 4) {
    case 0:  // Remove the node.
      if (j->at(parent).is_object()) {
        j->at(parent).erase(last);
      } else {
        j->at(parent).erase(static_cast<size_t>(std::stoul(last)));
      }
      break;
    case 1:  // Replace it by a copy of another node (a subtree moved elsewhere).
      j->at(p) = json(j->at(pointers[(*rng)() % pointers.size()]));
      break;
    default:
      j->at(p) = palette[(*rng)() % (sizeof(palette) / sizeof(palette[0]))];
  }
}

std::string RandomText(std::mt19937* rng, bool ascii_only) {
  static const char* const kPieces[] = {"the",
                                        " the",
                                        "hello",
                                        " world",
                                        "<s>",
                                        "</s>",
                                        "<|endoftext|>",
                                        "[SEP]",
                                        "<|begin_of_text|>",
                                        "\xE2\x96\x81",
                                        "é",
                                        "日本",
                                        "😀",
                                        "  ",
                                        "\n\n",
                                        "123456",
                                        "'s",
                                        "aaaa"};
  std::string text;
  const int n = static_cast<int>((*rng)() % 40);
  for (int i = 0; i < n; ++i) {
    const uint32_t r = (*rng)();
    if (ascii_only) {
      text.push_back(static_cast<char>(r % 4 == 0 ? " \n\t"[r / 4 % 3] : 32 + r / 4 % 95));
    } else if (r % 3 == 0) {
      text += kPieces[r / 3 % (sizeof(kPieces) / sizeof(kPieces[0]))];
    } else {
      text.push_back(static_cast<char>(r >> 8));  // Any byte, invalid UTF-8 included.
    }
  }
  return text;
}

// Exercises a loaded tokenizer; failures are reported with `what`.
void Exercise(const BpeTokenizer& tok, std::mt19937* rng, const std::string& what) {
  const int vocab = tok.vocab_size();
  ASSERT_GT(vocab, 0) << what;
  ASSERT_TRUE(tok.bos_id() >= 0 && tok.bos_id() < vocab) << what;
  ASSERT_TRUE(tok.eos_id() >= 0 && tok.eos_id() < vocab) << what;
  for (int k = 0; k < 3; ++k) {
    const std::string text = RandomText(rng, k == 0);
    const std::vector<int32_t> ids = tok.Encode(text);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < vocab) << what << ": id " << id;
    tok.Decode(ids);
    for (int32_t id : ids) tok.DecodeToken(id);
  }
  std::vector<int32_t> any_ids;
  for (int k = 0; k < 8; ++k) any_ids.push_back(static_cast<int32_t>((*rng)() % (vocab + 20)) - 10);
  any_ids.push_back(std::numeric_limits<int32_t>::min());
  any_ids.push_back(std::numeric_limits<int32_t>::max());
  tok.Decode(any_ids);
  for (int32_t id : any_ids) tok.DecodeToken(id);
}

TEST(TokenizerFuzzTest, ValidByteLevelFilesRoundTripRandomText) {
  std::mt19937 rng(99);
  for (const json& j : {Gpt2Json(), Llama3Json()}) {
    auto tok = BpeTokenizer::FromJson(j.dump(), "valid.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    ASSERT_TRUE((*tok)->byte_level());
    for (int iter = 0; iter < 300; ++iter) {
      std::string text = RandomText(&rng, iter % 2 == 0);
      if (iter % 2 == 1) {  // Arbitrary bytes, but never spelling an added token.
        for (char& c : text) c = c == '<' ? '>' : c == '[' ? ']' : c;
      }
      const std::vector<int32_t> ids = (*tok)->Encode(text);
      ASSERT_EQ((*tok)->Decode(ids), text) << iter;
      std::string streamed;
      for (int32_t id : ids) streamed += (*tok)->DecodeToken(id);
      ASSERT_EQ(streamed, text) << iter;
    }
  }
  // SentencePiece-style files round-trip ASCII without a leading space.
  for (const json& j : {SentencePieceJson(), MetaspaceJson()}) {
    auto tok = BpeTokenizer::FromJson(j.dump(), "valid_sp.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    for (int iter = 0; iter < 200; ++iter) {
      std::string text = "x" + RandomText(&rng, true);
      for (char& c : text) c = c == '<' ? '>' : c;
      ASSERT_EQ((*tok)->Decode((*tok)->Encode(text)), text) << iter;
    }
  }
}

TEST(TokenizerFuzzTest, MutatedFilesNeverCrash) {
  const std::vector<std::string> valid = ValidTexts();
  std::vector<json> parsed;
  for (const std::string& v : valid) {
    parsed.push_back(json::parse(v));
    ASSERT_TRUE(BpeTokenizer::FromJson(v, "valid.json").ok());
  }
  std::vector<std::vector<std::string>> tokens;
  for (const std::string& v : valid) tokens.push_back(JsonTokens(v));
  for (size_t i = 0; i < valid.size(); ++i) {  // The tokenizer of JSON text loses nothing.
    std::string joined;
    for (const std::string& t : tokens[i]) joined += t;
    ASSERT_EQ(joined, valid[i]);
  }
  std::mt19937 rng(FuzzSeed(4242));
  int loaded[6] = {0, 0, 0, 0, 0, 0};
  const int iterations = FuzzIterations(3000);
  for (int iter = 0; iter < iterations; ++iter) {
    const size_t which = rng() % valid.size();
    const std::string& base = valid[which];
    std::string text;
    const int kind = iter % 6;
    switch (kind) {
      case 0: {  // Random bytes, sometimes starting like a tokenizer.json.
        text = iter % 12 == 0 ? "{\"model\": {\"type\": \"BPE\", \"vocab\": " : "";
        for (int n = rng() % 200; n > 0; --n) text.push_back(static_cast<char>(rng()));
        break;
      }
      case 1:  // Truncated.
        text = base.substr(0, rng() % base.size());
        break;
      case 2:  // A few bytes edited.
        text = base;
        for (int n = 1 + rng() % 4; n > 0; --n) {
          const char kChars[] = "{}[]\",:0123456789-.e \\u\xFF\xE2\x80";
          text[rng() % text.size()] =
              rng() % 4 == 0 ? static_cast<char>(rng()) : kChars[rng() % (sizeof(kChars) - 1)];
        }
        break;
      case 3: {  // JSON tokens deleted, duplicated, swapped or replaced.
        std::vector<std::string> t = tokens[which];
        for (int n = 1 + rng() % 3; n > 0; --n) {
          const size_t a = rng() % t.size(), b = rng() % t.size();
          switch (rng() % 4) {
            case 0:
              t.erase(t.begin() + a);
              break;
            case 1:
              t.insert(t.begin() + a, t[a]);
              break;
            case 2:
              std::swap(t[a], t[b]);
              break;
            default:
              t[a] = t[b];
          }
        }
        for (const std::string& s : t) text += s;
        break;
      }
      default: {  // Structural edits of the parsed file (valid JSON, odd contents).
        json j = parsed[which];
        for (int n = 1 + rng() % 2; n > 0; --n) MutateStructure(&j, &rng);
        text = j.dump(-1, ' ', false, json::error_handler_t::replace);
      }
    }
    auto tok = BpeTokenizer::FromJson(text, "fuzz.json");
    if (!tok.ok()) {
      ASSERT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
      ASSERT_NE(tok.status().message().find("fuzz.json"), absl::string_view::npos) << tok.status();
      continue;
    }
    ++loaded[kind];
    Exercise(**tok, &rng, absl::StrFormat("iteration %d", iter));
    if (HasFatalFailure()) {
      ADD_FAILURE() << "input: " << text;
      return;
    }
  }
  // Byte and token edits of strings and numbers often leave a loadable file, and structural
  // edits of unused fields even more so: the loaded paths were exercised.
  EXPECT_GT(loaded[2] + loaded[3], iterations / 150);  // 71 of 3000 at the default seed.
  EXPECT_GT(loaded[4] + loaded[5], iterations / 30);   // 247 of 3000.
}

}  // namespace
}  // namespace eellm
