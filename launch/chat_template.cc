#include "launch/chat_template.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace eellm {
namespace {

// The id of `text` when the tokenizer encodes it as one token, else -1.
int32_t SingleToken(const Tokenizer& tok, absl::string_view text) {
  const std::vector<int32_t> ids = tok.Encode(text);
  return ids.size() == 1 ? ids[0] : -1;
}

bool HasMarkers(const Tokenizer& tok, std::initializer_list<absl::string_view> markers) {
  for (absl::string_view m : markers) {
    if (SingleToken(tok, m) < 0) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<ChatFormat> ResolveChatFormat(absl::string_view name, const Tokenizer& tok) {
  if (name == "chatml") return ChatFormat::kChatMl;
  if (name == "llama3") return ChatFormat::kLlama3;
  if (name == "plain") return ChatFormat::kPlain;
  if (name != "auto") {
    return absl::InvalidArgumentError(absl::StrCat("unknown chat template \"", name,
                                                   "\": expected auto, chatml, llama3 or plain"));
  }
  if (HasMarkers(tok, {"<|im_start|>", "<|im_end|>"})) return ChatFormat::kChatMl;
  if (HasMarkers(tok, {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"})) {
    return ChatFormat::kLlama3;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "the tokenizer (", tok.name(),
      ") has neither ChatML's nor Llama 3's chat markers as tokens; choose a chat template with "
      "--chat-template=chatml, llama3 or plain"));
}

const char* ChatFormatName(ChatFormat f) {
  switch (f) {
    case ChatFormat::kChatMl:
      return "chatml";
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kPlain:
      return "plain";
  }
  return "?";
}

absl::StatusOr<std::string> RenderChat(ChatFormat f, const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return absl::InvalidArgumentError("\"messages\" must not be empty");
  std::string out = f == ChatFormat::kLlama3 ? "<|begin_of_text|>" : "";
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role must be system, ",
                                                     "user or assistant, got \"", m.role, "\""));
    }
    switch (f) {
      case ChatFormat::kChatMl:
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
        break;
      case ChatFormat::kLlama3:  // the template trims each message
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                        absl::StripAsciiWhitespace(m.content), "<|eot_id|>");
        break;
      case ChatFormat::kPlain:
        absl::StrAppend(&out, m.role, ": ", m.content, "\n");
        break;
    }
  }
  switch (f) {
    case ChatFormat::kChatMl:
      return absl::StrCat(out, "<|im_start|>assistant\n");
    case ChatFormat::kLlama3:
      return absl::StrCat(out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    case ChatFormat::kPlain:
      return absl::StrCat(out, "assistant:");
  }
  return out;
}

std::vector<int32_t> EndOfTurnIds(ChatFormat f, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  auto add = [&](absl::string_view marker) {
    const int32_t id = SingleToken(tok, marker);
    if (id >= 0) ids.push_back(id);
  };
  if (f == ChatFormat::kChatMl) add("<|im_end|>");
  if (f == ChatFormat::kLlama3) {
    add("<|eot_id|>");
    add("<|eom_id|>");
  }
  return ids;
}

std::vector<std::string> EndOfTurnStrings(ChatFormat f) {
  // The markers as text too: a tokenizer may hold them as ordinary text (or not as tokens).
  switch (f) {
    case ChatFormat::kChatMl:
      return {"<|im_end|>"};
    case ChatFormat::kLlama3:
      return {"<|eot_id|>", "<|eom_id|>"};
    case ChatFormat::kPlain:
      return {"\nuser:"};
  }
  return {};
}

}  // namespace eellm
