// BpeTokenizer: loads a Hugging Face tokenizer.json holding a BPE model and implements the
// Tokenizer interface with it. Two flavours are supported:
//  * byte-level BPE (GPT-2, Llama-3, Qwen2): a ByteLevel pre-tokenizer and/or decoder. Text is
//    split into pieces by the GPT-2 pattern (or the cl100k/Llama-3 pattern when the file's
//    Split regex is of that family), each piece's bytes are mapped with GPT-2's bytes_to_unicode
//    table and merged by rank. Any byte string round-trips exactly (unless it spells a special
//    token, or the ByteLevel pre-tokenizer sets add_prefix_space, which adds a space).
//  * SentencePiece-style BPE (Llama-2, Mistral): spaces become "▁" (U+2581) and "▁" is prepended
//    (Prepend + Replace normalizers, or a Metaspace pre-tokenizer), characters missing from the
//    vocab fall back to "<0xAB>" byte tokens (byte_fallback) or to unk_token, and decoding maps
//    "▁" back to a space, byte tokens back to bytes and strips one leading space.
// Added tokens (added_tokens) are matched as whole strings (leftmost, then longest) before any
// normalization or BPE, so special tokens in the text encode to their single id.
//
// BOS/EOS: bos_id() is the first of "<s>", "<|begin_of_text|>", "<|endoftext|>" and eos_id() the
// first of "</s>", "<|end_of_text|>", "<|endoftext|>" found among the added tokens (then the
// vocab); when only one of the two is found it serves as both (GPT-2: "<|endoftext|>"). A file
// with neither is rejected. BOS, EOS and added tokens flagged "special" decode to no text.
//
// The post_processor (which adds BOS/EOS in Hugging Face) is ignored: Encode() adds no special
// ids, as the Tokenizer interface requires. model.ignore_merges (Llama-3) is honoured.
//
// Limitations (encodings may then differ from Hugging Face's, but still decode back exactly):
//  * The pre-tokenization regexes are implemented by hand, with the reference's Unicode classes
//    (\p{L}, \p{N}, \s as Hugging Face's Oniguruma sees them, Unicode 15; code points still
//    unassigned in Unicode 17 take the class of the code point before them). A Split regex is
//    treated as the cl100k pattern when it contains its [^\r\n\p{L}\p{N}]?\p{L}+ branch (digit
//    groups of 3 with \p{N}{1,3}, else 1, as in Qwen2), and as the GPT-2 pattern otherwise.
//    tools/tokenizer_check.sh compares encodings of real text with the Hugging Face library.
//  * NFC/NFD/NFKC/NFKD normalizers are ignored (text is assumed normalized); other normalizers,
//    regex Replace patterns and pre-tokenizers other than ByteLevel/Split/Metaspace/Sequence
//    are rejected. Added-token flags lstrip/rstrip/single_word/normalized are ignored. BPE
//    dropout is ignored (encoding is deterministic); continuing_subword_prefix and
//    end_of_word_suffix are rejected. Ids must be below 2^21.
//  * SentencePiece-style: a literal "▁" in the text decodes as a space; without byte_fallback
//    each unknown character becomes one unk_token (fuse_unk is not applied) and decodes as its
//    text, or as nothing when it is special; with a Metaspace pre-tokenizer (like Hugging
//    Face) a leading space of the text is not kept.
//  * DecodeToken() does not strip the leading space, so streaming a SentencePiece-style
//    sequence token by token yields one more leading space than Decode().
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "models/tokenizer.h"
#include "nlohmann/json_fwd.hpp"

namespace eellm {

class BpeTokenizer : public Tokenizer {
 public:
  // Reads and parses a tokenizer.json. A file that cannot be read gives NotFound; malformed
  // JSON, a missing model/vocab/merges, an unsupported model type (WordPiece, Unigram, ...) or
  // component, or inconsistent contents give InvalidArgument naming `path` and the problem.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Load(const std::string& path);
  // As Load(), from the JSON text; `name` is used in error messages and as name().
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromJson(absl::string_view json_text,
                                                                const std::string& name);

  std::vector<int32_t> Encode(absl::string_view text) const override;
  std::string Decode(absl::Span<const int32_t> ids) const override;
  std::string DecodeToken(int32_t id) const override;
  // Special ids share nothing; SentencePiece-style, the first share with text loses the leading
  // space Decode() drops.
  std::vector<std::string> DecodeShares(absl::Span<const int32_t> ids) const override;
  int vocab_size() const override { return vocab_size_; }
  int eos_id() const override { return eos_id_; }
  int bos_id() const override { return bos_id_; }
  std::string name() const override { return name_; }

  // True for the byte-level flavour, false for the SentencePiece-style one.
  bool byte_level() const { return byte_level_; }

 private:
  enum class SplitStyle { kNone, kGpt2, kCl100k };
  struct AddedToken {
    std::string content;
    int32_t id;
    bool special;
  };
  // A normalizer step: prepend `to` (when `prepend`) or replace every `from` with `to`.
  struct NormOp {
    bool prepend;
    std::string from, to;
  };

  BpeTokenizer() = default;

  absl::Status Parse(const nlohmann::json& j);
  absl::Status ParseStep(const nlohmann::json& c, const char* where, int depth);
  absl::Status Finish();

  // Appends the ids of one piece to *out (*symbols: reused buffer).
  void EncodePiece(absl::string_view piece, std::vector<int32_t>* symbols,
                   std::vector<int32_t>* out) const;
  void MergeSymbols(std::vector<int32_t>* symbols) const;
  const AddedToken* MatchAdded(absl::string_view text, size_t pos) const;

  std::string name_;
  bool byte_level_ = false;
  absl::flat_hash_map<std::string, int32_t> vocab_;
  // (left id << 32 | right id) -> (rank, merged id).
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  std::vector<std::string> text_;  // Decoded text of each id ("" for holes).
  std::vector<char> special_;      // Whether each id decodes to no text in Decode().
  std::vector<AddedToken> added_;
  std::array<std::vector<int>, 256> added_by_byte_;  // Indices into added_, longest first.
  std::array<int32_t, 256> byte_ids_{};              // Byte symbol ids (byte-level) or <0xAB> ids.
  std::vector<NormOp> norm_;
  SplitStyle split_ = SplitStyle::kNone;
  bool byte_level_pretok_ = false;          // A ByteLevel pre-tokenizer is present.
  bool add_prefix_space_ = false;           // ByteLevel add_prefix_space.
  int max_digits_ = 3;                      // cl100k: \p{N}{1,max_digits_}.
  bool metaspace_ = false;                  // Metaspace pre-tokenizer present.
  std::string meta_repl_ = "\xE2\x96\x81";  // "▁"
  int meta_prepend_ = 2;                    // 0 never, 1 first, 2 always.
  bool meta_split_ = true;
  bool byte_fallback_ = false;
  bool strip_leading_space_ = false;  // SentencePiece-style decoding drops one leading space.
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  int vocab_size_ = 0;
  int bos_id_ = 0;
  int eos_id_ = 0;
};

}  // namespace eellm
