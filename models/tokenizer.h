// Tokenizers: the abstract Tokenizer interface used by data preparation and generation, the
// built-in ByteTokenizer (raw UTF-8 bytes plus two special ids), and MakeTokenizer(), which
// turns a command-line spec into a tokenizer: "byte", the path of a Hugging Face tokenizer.json
// (BpeTokenizer in models/bpe_tokenizer.h: byte-level or SentencePiece-style BPE), GPT-2's
// vocab.json and merges.txt, or a SentencePiece BPE tokenizer.model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace eellm {

// Maps text to token ids and back. Implementations are immutable after construction, so one
// instance may be shared across threads.
class Tokenizer {
 public:
  virtual ~Tokenizer();

  // Encodes `text` without adding BOS/EOS; callers add special ids where they want them.
  virtual std::vector<int32_t> Encode(absl::string_view text) const = 0;
  // Decodes a sequence of ids to text. Special ids (EOS, BOS, ...) and ids outside
  // [0, vocab_size()) produce no text.
  virtual std::string Decode(absl::Span<const int32_t> ids) const = 0;
  // The text of one token, for streaming output and debugging. For byte-level tokenizers this
  // may be a partial UTF-8 sequence. Special ids give their printable name (e.g.
  // "<|endoftext|>"); ids outside [0, vocab_size()) give "".
  virtual std::string DecodeToken(int32_t id) const = 0;
  // Each id's share of Decode(ids): texts whose concatenation is Decode(ids) where the
  // tokenizer's decoding is a concatenation of per-token texts (possibly with an edit at the
  // start, such as a dropped leading space); linear in the ids. The default gives each id's
  // Decode() alone, which is its share for tokenizers that only concatenate.
  virtual std::vector<std::string> DecodeShares(absl::Span<const int32_t> ids) const;

  virtual int vocab_size() const = 0;
  virtual int eos_id() const = 0;
  virtual int bos_id() const = 0;
  // Short description for logs and checkpoint metadata ("byte", a tokenizer.json path, ...).
  virtual std::string name() const = 0;
};

// One token per byte: ids 0..255 are the bytes, 256 is end-of-text (EOS) and 257 is
// begin-of-text (BOS). Round-trips any byte string exactly.
class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int kEosId = 256;
  static constexpr int kBosId = 257;
  static constexpr int kVocabSize = 258;

  std::vector<int32_t> Encode(absl::string_view text) const override;
  std::string Decode(absl::Span<const int32_t> ids) const override;
  std::string DecodeToken(int32_t id) const override;
  int vocab_size() const override { return kVocabSize; }
  int eos_id() const override { return kEosId; }
  int bos_id() const override { return kBosId; }
  std::string name() const override { return "byte"; }
};

// Builds a tokenizer from a spec: "byte" gives a ByteTokenizer; a path ending in ".json" a
// BpeTokenizer loaded from it, a Hugging Face tokenizer.json or GPT-2's vocab.json with its
// merges.txt beside it (models/gpt2_bpe_files.h); "VOCAB.json,MERGES.txt" names GPT-2's two
// files (Megatron-LM's --vocab-file and --merge-file); a path ending in ".model" a SentencePiece
// BPE model (Megatron-LM's --tokenizer-model; models/sentencepiece_model.h). Any other value is
// an InvalidArgument error naming it.
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(absl::string_view spec);

// The tokenizer.json text a BPE spec of MakeTokenizer stands for (the file itself, or the one
// built from GPT-2's files), to keep beside a checkpoint.
absl::StatusOr<std::string> TokenizerJson(absl::string_view spec);

}  // namespace eellm
