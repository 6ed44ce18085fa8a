// Chat prompts for POST /v1/chat/completions: a conversation (system, user and assistant
// messages) rendered as the text an instruction-tuned model was trained on, ending where the
// assistant's reply starts, and the token that ends the reply. Built-in formats instead of the
// Jinja templates of tokenizer_config.json:
//   chatml  <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
//           (Qwen2, Qwen2.5 and other ChatML models; Qwen3's empty thinking block, which its
//           template adds to turn thinking off, is not); ends at <|im_end|>
//   llama3  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
//           ... <|start_header_id|>assistant<|end_header_id|>\n\n (Llama 3, 3.1, 3.2, 3.3);
//           ends at <|eot_id|> (or <|eom_id|>)
//   plain   "{role}: {content}\n" per message, then "assistant:"; ends at "\nuser:" or EOS (for
//           base models and the demo's byte-level tokenizer)
// "auto" takes chatml or llama3 when the tokenizer holds their markers as single tokens. The
// models' templates also add default system prompts (Qwen2.5's, Llama 3.1's knowledge-cutoff
// header) and tool calls; these formats do not.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "models/tokenizer.h"

namespace eellm {

enum class ChatFormat { kChatMl, kLlama3, kPlain };

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

// "chatml", "llama3", "plain", or "auto" (resolved against `tok`: an error names the formats when
// its markers are not found).
absl::StatusOr<ChatFormat> ResolveChatFormat(absl::string_view name, const Tokenizer& tok);
const char* ChatFormatName(ChatFormat f);

// The prompt text of `messages` (at least one; roles checked), ending with the assistant's turn
// opened.
absl::StatusOr<std::string> RenderChat(ChatFormat f, const std::vector<ChatMessage>& messages);

// The token ids that end an assistant's reply in format `f` (besides the tokenizer's EOS), and
// the text that does (the markers, for tokenizers that hold them as text; plain's next turn).
std::vector<int32_t> EndOfTurnIds(ChatFormat f, const Tokenizer& tok);
std::vector<std::string> EndOfTurnStrings(ChatFormat f);

}  // namespace eellm
