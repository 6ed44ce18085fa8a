// Token-file reading/writing and PrepareTokenData() (text or JSON lines -> train/val token
// files).
#include "models/token_file.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

constexpr size_t kMagicBytes = 8;

// Closes a FILE* on scope exit.
struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

absl::Status OpenError(const std::string& what, const std::string& path, int err) {
  if (err == ENOENT) return absl::NotFoundError(absl::StrCat(what, " ", path, " does not exist"));
  return absl::ErrnoToStatus(err, absl::StrCat("cannot open ", what, " ", path));
}

// Reads the whole file at `path` into a string.
absl::StatusOr<std::string> ReadWholeFile(const std::string& what, const std::string& path) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (f == nullptr) return OpenError(what, path, errno);
  std::string data;
  char buf[1 << 16];
  while (true) {
    size_t n = std::fread(buf, 1, sizeof(buf), f.get());
    data.append(buf, n);
    if (n < sizeof(buf)) break;
  }
  if (std::ferror(f.get())) {
    return absl::DataLossError(absl::StrCat("error reading ", what, " ", path));
  }
  return data;
}

void PutU32(uint32_t v, unsigned char* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

uint32_t GetU32(const unsigned char* in) {
  return static_cast<uint32_t>(in[0]) | (static_cast<uint32_t>(in[1]) << 8) |
         (static_cast<uint32_t>(in[2]) << 16) | (static_cast<uint32_t>(in[3]) << 24);
}

// True when a split placed just after token `id` starts a new line (or a new document, after
// the end-of-text id that JSONL documents end with).
bool EndsLine(const Tokenizer& tok, int32_t id) {
  if (id == tok.eos_id()) return true;
  std::string text = tok.DecodeToken(id);
  return !text.empty() && text.back() == '\n';
}

// JSON lines: each non-empty line an object; the string under each of `keys`, in order, is a
// document, encoded and followed by the end-of-text id (Megatron's preprocess_data.py with
// --append-eod).
absl::StatusOr<std::vector<int32_t>> EncodeJsonLines(const std::string& text, const Tokenizer& tok,
                                                     const std::vector<std::string>& keys,
                                                     const std::string& path) {
  std::vector<int32_t> tokens;
  size_t start = 0;
  for (int64_t line_no = 1; start < text.size(); ++line_no) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const absl::string_view line(text.data() + start, end - start);
    start = end + 1;
    if (line.find_first_not_of(" \t\r") == absl::string_view::npos) continue;
    const nlohmann::json doc = nlohmann::json::parse(line, nullptr, false);
    if (doc.is_discarded() || !doc.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " line ", line_no, " is not a JSON object"));
    }
    for (const std::string& key : keys) {
      auto v = doc.find(key);
      if (v == doc.end() || !v->is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, " line ", line_no, " has no string \"", key, "\" (--json_keys)"));
      }
      const std::vector<int32_t> ids = tok.Encode(v->get<std::string>());
      tokens.insert(tokens.end(), ids.begin(), ids.end());
      tokens.push_back(tok.eos_id());
    }
  }
  return tokens;
}

}  // namespace

absl::Status WriteTokenFile(const std::string& path, absl::Span<const int32_t> tokens,
                            int vocab_size) {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file ", path, ": vocab_size must be positive, got ", vocab_size));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": token ", i, " = ",
                                                     tokens[i], " is outside [0, ", vocab_size,
                                                     ")"));
    }
  }
  const uint32_t width = vocab_size <= 65536 ? 2 : 4;

  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) {
      return absl::ErrnoToStatus(ec.value(),
                                 absl::StrCat("cannot create directory ", parent.string()));
    }
  }

  const std::string tmp = path + ".tmp";
  FilePtr f(std::fopen(tmp.c_str(), "wb"));
  if (f == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", tmp));
  errno = 0;

  unsigned char header[kTokenFileHeaderBytes];
  std::memcpy(header, kTokenFileMagic, kMagicBytes);
  PutU32(kTokenFileVersion, header + 8);
  PutU32(width, header + 12);
  bool ok = std::fwrite(header, 1, sizeof(header), f.get()) == sizeof(header);

  std::vector<unsigned char> buf;
  constexpr size_t kChunk = 1 << 16;  // tokens per write
  for (size_t start = 0; ok && start < tokens.size(); start += kChunk) {
    const size_t end = std::min(tokens.size(), start + kChunk);
    buf.resize((end - start) * width);
    unsigned char* out = buf.data();
    for (size_t i = start; i < end; ++i, out += width) {
      const uint32_t v = static_cast<uint32_t>(tokens[i]);
      for (uint32_t b = 0; b < width; ++b) out[b] = static_cast<unsigned char>(v >> (8 * b));
    }
    ok = std::fwrite(buf.data(), 1, buf.size(), f.get()) == buf.size();
  }
  const int write_errno = errno;
  ok = (std::fflush(f.get()) == 0) && ok;
  ok = (std::fclose(f.release()) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(write_errno != 0 ? write_errno : EIO,
                               absl::StrCat("error writing token file ", tmp));
  }

  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(ec.value(), absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ReadTokenFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string data, ReadWholeFile("token file", path));
  if (data.size() < static_cast<size_t>(kTokenFileHeaderBytes)) {
    return absl::DataLossError(absl::StrCat("token file ", path, " is truncated: ", data.size(),
                                            " bytes, shorter than the ", kTokenFileHeaderBytes,
                                            "-byte header"));
  }
  const auto* bytes = reinterpret_cast<const unsigned char*>(data.data());
  if (std::memcmp(bytes, kTokenFileMagic, kMagicBytes) != 0) {
    return absl::DataLossError(absl::StrCat("token file ", path,
                                            " has a bad magic (expected \"EELLMTOK\"); not an "
                                            "eellm token file"));
  }
  const uint32_t version = GetU32(bytes + 8);
  if (version != kTokenFileVersion) {
    return absl::UnimplementedError(absl::StrCat("token file ", path, " has version ", version,
                                                 "; this build reads version ", kTokenFileVersion));
  }
  const uint32_t width = GetU32(bytes + 12);
  if (width != 2 && width != 4) {
    return absl::DataLossError(absl::StrCat("token file ", path, " has bad bytes-per-token ", width,
                                            " (expected 2 or 4)"));
  }
  const size_t body = data.size() - kTokenFileHeaderBytes;
  if (body % width != 0) {
    return absl::DataLossError(absl::StrCat("token file ", path, " is truncated: body of ", body,
                                            " bytes is not a multiple of ", width,
                                            " bytes per token"));
  }

  std::vector<int32_t> tokens(body / width);
  const unsigned char* in = bytes + kTokenFileHeaderBytes;
  if (width == 2) {
    for (size_t i = 0; i < tokens.size(); ++i, in += 2) {
      tokens[i] = static_cast<int32_t>(in[0] | (in[1] << 8));
    }
  } else {
    for (size_t i = 0; i < tokens.size(); ++i, in += 4) {
      const uint32_t v = GetU32(in);
      if (v > 0x7fffffffu) {
        return absl::DataLossError(
            absl::StrCat("token file ", path, ": token ", i, " = ", v, " does not fit in int32"));
      }
      tokens[i] = static_cast<int32_t>(v);
    }
  }
  return tokens;
}

absl::StatusOr<DataPrepResult> PrepareTokenData(const std::string& text_path, const Tokenizer& tok,
                                                const std::string& out_prefix, double val_fraction,
                                                const std::vector<std::string>& json_keys) {
  if (!(val_fraction > 0.0 && val_fraction <= 0.5)) {
    return absl::InvalidArgumentError(
        absl::StrCat("val_fraction must be in (0, 0.5], got ", val_fraction));
  }
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile("text file", text_path));
  if (text.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("text file ", text_path, " is empty"));
  }
  std::vector<int32_t> tokens;
  if (absl::EndsWith(text_path, ".jsonl")) {
    ASSIGN_OR_RETURN(tokens, EncodeJsonLines(text, tok, json_keys, text_path));
  } else {
    tokens = tok.Encode(text);
  }
  text.clear();
  text.shrink_to_fit();

  constexpr int64_t kMinSplitTokens = 2;  // one input/target pair
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t target_val = std::llround(static_cast<double>(n) * val_fraction);
  if (target_val < kMinSplitTokens || n - target_val < kMinSplitTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("too few tokens: text file ", text_path, " encodes to ", n,
                     " tokens, and val_fraction ", val_fraction, " gives ", target_val,
                     " validation tokens; each split needs at least ", kMinSplitTokens));
  }

  // Move the cut to the nearest line start within the window, if there is one.
  const int64_t target_cut = n - target_val;
  const int64_t window = std::min<int64_t>(4096, target_val / 10);
  int64_t cut = target_cut;
  for (int64_t d = 0; d <= window; ++d) {
    const int64_t later = target_cut + d;  // smaller validation split
    if (n - later >= kMinSplitTokens && EndsLine(tok, tokens[later - 1])) {
      cut = later;
      break;
    }
    const int64_t earlier = target_cut - d;  // larger validation split
    if (earlier >= kMinSplitTokens && EndsLine(tok, tokens[earlier - 1])) {
      cut = earlier;
      break;
    }
  }

  const absl::Span<const int32_t> all(tokens);
  RETURN_IF_ERROR(WriteTokenFile(out_prefix + ".train.bin", all.subspan(0, cut), tok.vocab_size()));
  RETURN_IF_ERROR(WriteTokenFile(out_prefix + ".val.bin", all.subspan(cut), tok.vocab_size()));
  DataPrepResult result;
  result.train_tokens = cut;
  result.val_tokens = n - cut;
  return result;
}

}  // namespace eellm
