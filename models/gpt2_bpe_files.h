// GPT-2's original tokenizer files, vocab.json and merges.txt (what Megatron-LM's
// GPT2BPETokenizer reads through --vocab-file and --merge-file), turned into the equivalent
// Hugging Face tokenizer.json (byte-level BPE, the GPT-2 split pattern, no prefix space,
// "<|endoftext|>" as the special token when the vocabulary has it), which BpeTokenizer loads.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace eellm {

// The tokenizer.json text of a vocab.json ({"token": id, ...}) and a merges.txt (an optional
// "#version" line, then one "left right" pair per line, highest priority first). Errors name
// the file and, for merges, the line.
absl::StatusOr<std::string> Gpt2FilesToTokenizerJson(const std::string& vocab_path,
                                                     const std::string& merges_path);

// The merges file that goes with `vocab_path`: in the same directory, the file name with its
// last "vocab" replaced by "merges" and ".json" by ".txt" (gpt2-vocab.json -> gpt2-merges.txt,
// vocab.json -> merges.txt).
std::string Gpt2MergesBeside(const std::string& vocab_path);

}  // namespace eellm
