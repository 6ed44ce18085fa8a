// SentencePiece's tokenizer.model (what Megatron-LM's Llama2Tokenizer and SentencePieceTokenizer
// read through --tokenizer-model; Llama-2, Mistral) turned into the equivalent Hugging Face
// tokenizer.json, as the transformers library's Llama converter builds it: the pieces as the BPE
// vocabulary, merges of every piece that splits into two pieces ordered by the merged piece's
// score, "▁" prepended and spaces replaced by it, byte fallback through the <0xAB> pieces, and
// the control and unknown pieces as special added tokens. BpeTokenizer then loads it.
//
// The file is a protocol buffer (sentencepiece_model.proto's ModelProto), read here without the
// protobuf library: pieces (piece, score, type), trainer_spec.model_type and the normalizer
// spec's name, add_dummy_prefix and remove_extra_whitespaces. Only BPE models with the identity
// normalizer that keep whitespace as it is are accepted; others are refused by name (unigram
// models such as T5's, NFKC normalization, whitespace collapsing).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace eellm {

// The tokenizer.json text of a tokenizer.model's bytes; errors name `name` and what is wrong.
absl::StatusOr<std::string> SentencePieceToTokenizerJson(absl::string_view model_bytes,
                                                         const std::string& name);

// The same from a file (NotFound when it cannot be read).
absl::StatusOr<std::string> SentencePieceFileToTokenizerJson(const std::string& path);

}  // namespace eellm
