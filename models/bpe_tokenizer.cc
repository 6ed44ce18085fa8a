// BpeTokenizer: Hugging Face tokenizer.json loading, hand-written GPT-2/cl100k pre-tokenization,
// rank-ordered BPE merging and decoding. See bpe_tokenizer.h for the supported subset.
#include "models/bpe_tokenizer.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <queue>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

constexpr int kMaxId = 1 << 21;  // Ids must be below this (bounds the id -> text table).
constexpr int kMaxDepth = 16;    // Nesting limit for Sequence components.

// Decodes the UTF-8 sequence starting at s[i] into *cp and returns its length; an invalid or
// truncated sequence gives length 1 and U+FFFD.
int DecodeUtf8(absl::string_view s, size_t i, uint32_t* cp) {
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  const unsigned char c = s[i];
  int len = 1;
  uint32_t v = c;
  if (c >= 0xC0 && c < 0xF8) len = c < 0xE0 ? 2 : (c < 0xF0 ? 3 : 4);
  *cp = 0xFFFD;
  if (c >= 0x80 && len == 1) return 1;
  if (len == 1) return *cp = c, 1;
  if (i + len > s.size()) return 1;
  v = c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    const unsigned char d = s[i + k];
    if ((d & 0xC0) != 0x80) return 1;
    v = (v << 6) | (d & 0x3F);
  }
  if (v < kMin[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 1;
  *cp = v;
  return len;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

struct ClassRange {
  uint32_t lo, hi;
  CharClass cls;
};

// Classes of non-ASCII code points; the first matching range wins, anything else is a letter.
constexpr ClassRange kClassRanges[] = {
    {0x85, 0x85, kSpace},       {0xA0, 0xA0, kSpace},       {0x1680, 0x1680, kSpace},
    {0x2000, 0x200A, kSpace},   {0x2028, 0x2029, kSpace},   {0x202F, 0x202F, kSpace},
    {0x205F, 0x205F, kSpace},   {0x3000, 0x3000, kSpace},   {0xB2, 0xB3, kNumber},
    {0xB9, 0xB9, kNumber},      {0xBC, 0xBE, kNumber},      {0x660, 0x669, kNumber},
    {0x6F0, 0x6F9, kNumber},    {0x966, 0x96F, kNumber},    {0x2070, 0x2070, kNumber},
    {0x2074, 0x2079, kNumber},  {0x2080, 0x2089, kNumber},  {0x2150, 0x2189, kNumber},
    {0x2460, 0x249B, kNumber},  {0x24EA, 0x24FF, kNumber},  {0x2776, 0x2793, kNumber},
    {0x3007, 0x3007, kNumber},  {0x3021, 0x3029, kNumber},  {0xFF10, 0xFF19, kNumber},
    {0xAA, 0xAA, kLetter},      {0xB5, 0xB5, kLetter},      {0xBA, 0xBA, kLetter},
    {0x3005, 0x3006, kLetter},  {0x80, 0xBF, kOther},       {0xD7, 0xD7, kOther},
    {0xF7, 0xF7, kOther},       {0x300, 0x36F, kOther},     {0x2000, 0x206F, kOther},
    {0x20A0, 0x20FF, kOther},   {0x2190, 0x2BFF, kOther},   {0x2E00, 0x2E7F, kOther},
    {0x3001, 0x303F, kOther},   {0xD800, 0xF8FF, kOther},   {0xFE00, 0xFE6F, kOther},
    {0xFF01, 0xFF20, kOther},   {0xFF3B, 0xFF40, kOther},   {0xFF5B, 0xFF65, kOther},
    {0xFFF0, 0xFFFF, kOther},   {0x1F000, 0x1FAFF, kOther}, {0xE0000, 0x10FFFF, kOther},
};

CharClass Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return kLetter;
    if (cp >= '0' && cp <= '9') return kNumber;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return kSpace;
    return kOther;
  }
  for (const ClassRange& r : kClassRanges) {
    if (cp >= r.lo && cp <= r.hi) return r.cls;
  }
  return kLetter;
}

// GPT-2's bytes_to_unicode(): printable bytes map to themselves, the rest to 256, 257, ...
struct ByteMap {
  std::string symbol[256];  // UTF-8 of each byte's code point.
  int byte_of[324];         // Code point -> byte, or -1.
};

const ByteMap& GetByteMap() {
  static const ByteMap* map = [] {
    auto* m = new ByteMap;
    std::fill(std::begin(m->byte_of), std::end(m->byte_of), -1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const uint32_t cp = keep ? b : 256 + extra++;
      AppendUtf8(cp, &m->symbol[b]);
      m->byte_of[cp] = b;
    }
    return m;
  }();
  return *map;
}

// Splits `s` like the GPT-2 regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// or the cl100k (Llama-3) regex, with \p{N}{1,max_digits}:
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
void SplitPieces(absl::string_view s, bool cl100k, size_t max_digits,
                 std::vector<absl::string_view>* out) {
  std::vector<uint32_t> cp;
  std::vector<CharClass> cls;
  std::vector<size_t> off;
  for (size_t i = 0; i < s.size();) {
    uint32_t c;
    const int len = DecodeUtf8(s, i, &c);
    cp.push_back(c);
    cls.push_back(Classify(c));
    off.push_back(i);
    i += len;
  }
  const size_t n = cp.size();
  off.push_back(s.size());
  auto is = [&](size_t j, CharClass c) { return j < n && cls[j] == c; };
  auto is_nl = [&](size_t j) { return j < n && (cp[j] == '\r' || cp[j] == '\n'); };
  auto run = [&](size_t j, CharClass c) {
    while (is(j, c)) ++j;
    return j;
  };
  auto lower = [&](size_t j) -> uint32_t {
    const uint32_t c = j < n ? cp[j] : 0;
    return cl100k && c >= 'A' && c <= 'Z' ? c + 32 : c;
  };
  auto match = [&](size_t i) -> size_t {
    if (cp[i] == '\'') {
      const uint32_t a = lower(i + 1), b = lower(i + 2);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    }
    const size_t j = cp[i] == ' ' ? i + 1 : i;
    if (!cl100k) {
      if (is(j, kLetter) || is(j, kNumber) || is(j, kOther)) return run(j, cls[j]);
    } else {
      if (cls[i] == kLetter) return run(i, kLetter);
      if (cls[i] != kNumber && !is_nl(i) && is(i + 1, kLetter)) return run(i + 1, kLetter);
      if (cls[i] == kNumber) {
        size_t e = i;
        while (is(e, kNumber) && e - i < max_digits) ++e;
        return e;
      }
      if (is(j, kOther)) {
        size_t e = run(j, kOther);
        while (is_nl(e)) ++e;
        return e;
      }
      size_t last_nl = n;
      for (size_t k = i; is(k, kSpace); ++k) {
        if (is_nl(k)) last_nl = k;
      }
      if (last_nl < n) return last_nl + 1;
    }
    // \s+(?!\S)|\s+ : a whitespace run, less its last character when a non-space follows.
    const size_t e = run(i, kSpace);
    if (e == i) return i + 1;  // Unreachable: every character has a class.
    return (e < n && e - i >= 2) ? e - 1 : e;
  };
  for (size_t i = 0; i < n;) {
    const size_t e = match(i);
    out->push_back(s.substr(off[i], off[e] - off[i]));
    i = e;
  }
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// The string field `key` of `obj`, or `dflt` when absent or not a string.
std::string StrField(const json& obj, const char* key, const std::string& dflt = "") {
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : dflt;
}

bool BoolField(const json& obj, const char* key, bool dflt) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_boolean() ? it->get<bool>() : dflt;
}

absl::Status Invalid(absl::string_view what) { return absl::InvalidArgumentError(what); }

}  // namespace

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return FromJson(ss.str(), path);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromJson(absl::string_view json_text,
                                                                      const std::string& name) {
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", what));
  };
  std::unique_ptr<BpeTokenizer> tok(new BpeTokenizer());
  tok->name_ = name;
  absl::Status status;
  try {
    json j;
    try {
      j = json::parse(json_text.begin(), json_text.end());
    } catch (const json::exception& e) {
      return error(absl::StrCat("malformed JSON: ", std::string(e.what()).substr(0, 200)));
    }
    if (!j.is_object()) return error("the top level is not a JSON object");
    auto model = j.find("model");
    if (model == j.end() || !model->is_object()) return error("missing \"model\" object");
    status = tok->ParseModel(*model);
    if (status.ok()) status = tok->ParseNormalizer(j.value("normalizer", json()), 0);
    if (status.ok()) status = tok->ParsePreTokenizer(j.value("pre_tokenizer", json()), 0);
    if (status.ok()) {
      auto added = j.find("added_tokens");
      if (added != j.end() && !added->is_null() && !added->is_array()) {
        status = Invalid("\"added_tokens\" is not an array");
      } else if (added != j.end() && added->is_array()) {
        for (size_t i = 0; i < added->size() && status.ok(); ++i) {
          const json& a = (*added)[i];
          auto id = a.is_object() ? a.find("id") : a.end();
          const std::string content = a.is_object() ? StrField(a, "content") : "";
          if (id == a.end() || !id->is_number_integer() || *id < 0 || *id >= kMaxId ||
              content.empty()) {
            status = Invalid(absl::StrCat("added_tokens[", i, "] needs an \"id\" in [0, ", kMaxId,
                                          ") and a non-empty \"content\""));
            break;
          }
          tok->added_.push_back({content, id->get<int32_t>()});
          if (BoolField(a, "special", false)) tok->special_.push_back(1);
          else tok->special_.push_back(0);
        }
      }
    }
    if (status.ok()) {
      tok->byte_level_ = tok->byte_level_pretok_ ||
                         tok->HasByteLevelDecoder(j.value("decoder", json()), 0);
      status = tok->Finish();
    }
  } catch (const json::exception& e) {
    status = Invalid(absl::StrCat("unexpected JSON content: ", e.what()));
  }
  if (!status.ok()) return error(status.message());
  return tok;
}

absl::Status BpeTokenizer::ParseModel(const json& model) {
  const std::string type = StrField(model, "type", "BPE");
  if (type != "BPE") {
    return Invalid(absl::StrCat("model.type \"", type, "\" is not supported (only \"BPE\")"));
  }
  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object() || vocab->empty()) {
    return Invalid("missing or empty model.vocab (expected an object of token -> id)");
  }
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it->is_number_integer() || *it < 0 || *it >= kMaxId) {
      return Invalid(absl::StrCat("model.vocab[\"", it.key(), "\"] is ", it->dump(),
                                  ", not an id in [0, ", kMaxId, ")"));
    }
    vocab_[it.key()] = it->get<int32_t>();
  }
  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return Invalid("missing model.merges (expected an array of \"a b\" or [a, b])");
  }
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos) {
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      }
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    if (a.empty() || b.empty()) {
      return Invalid(absl::StrCat("model.merges[", i, "] is not \"a b\" or [a, b]"));
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end()) {
      return Invalid(absl::StrCat("model.merges[", i, "] (\"", a, "\", \"", b,
                                  "\") uses a token that is not in model.vocab"));
    }
    merges_[PairKey(ia->second, ib->second)] = {static_cast<int32_t>(i), iab->second};
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!StrField(model, key).empty()) {
      return Invalid(absl::StrCat("model.", key, " is not supported"));
    }
  }
  byte_fallback_ = BoolField(model, "byte_fallback", false);
  ignore_merges_ = BoolField(model, "ignore_merges", false);
  const std::string unk = StrField(model, "unk_token");
  auto unk_it = vocab_.find(unk);
  if (!unk.empty() && unk_it != vocab_.end()) unk_id_ = unk_it->second;
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParseNormalizer(const json& n, int depth) {
  if (n.is_null()) return absl::OkStatus();
  if (!n.is_object() || depth > kMaxDepth) return Invalid("normalizer is not a valid object");
  const std::string type = StrField(n, "type");
  if (type == "Sequence") {
    auto list = n.find("normalizers");
    if (list == n.end() || !list->is_array()) return Invalid("normalizer Sequence has no list");
    for (const json& item : *list) {
      absl::Status s = ParseNormalizer(item, depth + 1);
      if (!s.ok()) return s;
    }
  } else if (type == "Prepend") {
    norm_.push_back({true, "", StrField(n, "prepend")});
  } else if (type == "Replace") {
    auto pattern = n.find("pattern");
    if (pattern == n.end() || !pattern->is_object() || !pattern->contains("String") ||
        !(*pattern)["String"].is_string() || !n.contains("content")) {
      return Invalid("normalizer Replace is supported only with a String pattern and content");
    }
    norm_.push_back({false, (*pattern)["String"].get<std::string>(), StrField(n, "content")});
  } else if (type != "NFC" && type != "NFD" && type != "NFKC" && type != "NFKD") {
    return Invalid(absl::StrCat("normalizer type \"", type, "\" is not supported"));
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParsePreTokenizer(const json& p, int depth) {
  if (p.is_null()) return absl::OkStatus();
  if (!p.is_object() || depth > kMaxDepth) return Invalid("pre_tokenizer is not a valid object");
  const std::string type = StrField(p, "type");
  if (type == "Sequence") {
    auto list = p.find("pretokenizers");
    if (list == p.end() || !list->is_array()) return Invalid("pre_tokenizer Sequence has no list");
    for (const json& item : *list) {
      absl::Status s = ParsePreTokenizer(item, depth + 1);
      if (!s.ok()) return s;
    }
  } else if (type == "ByteLevel") {
    byte_level_pretok_ = true;
    add_prefix_space_ = BoolField(p, "add_prefix_space", true);
    byte_level_regex_ = BoolField(p, "use_regex", true);
  } else if (type == "Split") {
    auto pattern = p.find("pattern");
    if (pattern == p.end() || !pattern->is_object() || !pattern->contains("Regex") ||
        !(*pattern)["Regex"].is_string()) {
      return Invalid("pre_tokenizer Split is supported only with a Regex pattern");
    }
    const std::string re = (*pattern)["Regex"].get<std::string>();
    if (absl::StrContains(re, "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+")) {
      split_ = SplitStyle::kCl100k;
      max_digits_ = absl::StrContains(re, "\\p{N}{1,3}") ? 3
                    : absl::StrContains(re, "\\p{N}+")    ? INT_MAX
                                                         : 1;
    } else {
      split_ = SplitStyle::kGpt2;
    }
  } else if (type == "Metaspace") {
    metaspace_ = true;
    meta_repl_ = StrField(p, "replacement", "\xE2\x96\x81");
    if (meta_repl_.empty()) return Invalid("pre_tokenizer Metaspace has an empty replacement");
    const std::string scheme =
        StrField(p, "prepend_scheme", BoolField(p, "add_prefix_space", true) ? "always" : "never");
    meta_prepend_ = scheme == "never" ? 0 : (scheme == "first" ? 1 : 2);
    meta_split_ = BoolField(p, "split", true);
  } else {
    return Invalid(absl::StrCat("pre_tokenizer type \"", type, "\" is not supported"));
  }
  return absl::OkStatus();
}

bool BpeTokenizer::HasByteLevelDecoder(const json& d, int depth) const {
  if (!d.is_object() || depth > kMaxDepth) return false;
  if (StrField(d, "type") == "ByteLevel") return true;
  auto list = d.find("decoders");
  if (list == d.end() || !list->is_array()) return false;
  for (const json& item : *list) {
    if (HasByteLevelDecoder(item, depth + 1)) return true;
  }
  return false;
}

// Checks the flavour's requirements and builds the id tables. On entry special_[i] holds the
// special flag of added_[i].
absl::Status BpeTokenizer::Finish() {
  if (split_ == SplitStyle::kNone && byte_level_regex_) split_ = SplitStyle::kGpt2;
  if (!byte_level_pretok_) split_ = SplitStyle::kNone;
  std::string space_symbol = metaspace_ ? meta_repl_ : "\xE2\x96\x81";
  bool prepends = metaspace_ && meta_prepend_ > 0;
  for (const NormOp& op : norm_) {
    if (!op.prepend && op.from == " " && !op.to.empty()) space_symbol = op.to;
    if (op.prepend && op.to == space_symbol) prepends = true;
  }
  const bool sp_style = metaspace_ || byte_fallback_ || prepends;
  if (!byte_level_ && !sp_style) {
    return Invalid(
        "unsupported BPE flavour: expected a ByteLevel pre-tokenizer or decoder (GPT-2 style) "
        "or \"\xE2\x96\x81\" spaces with byte_fallback (SentencePiece style)");
  }
  const ByteMap& bm = GetByteMap();
  for (int b = 0; b < 256; ++b) {
    const std::string sym = byte_level_ ? bm.symbol[b] : absl::StrFormat("<0x%02X>", b);
    auto it = vocab_.find(sym);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
    if (byte_ids_[b] < 0 && (byte_level_ || byte_fallback_)) {
      return Invalid(absl::StrFormat("model.vocab lacks the token \"%s\" for byte 0x%02X",
                                     sym.c_str(), b));
    }
  }
  if (!byte_level_ && !byte_fallback_ && unk_id_ < 0) {
    return Invalid("SentencePiece-style BPE needs byte_fallback or an unk_token in the vocab");
  }
  strip_leading_space_ = !byte_level_ && prepends;

  int max_id = -1;
  for (const auto& [token, id] : vocab_) max_id = std::max(max_id, id);
  for (const AddedToken& a : added_) max_id = std::max(max_id, a.id);
  vocab_size_ = max_id + 1;
  text_.assign(vocab_size_, "");
  std::vector<char> added_special = std::move(special_);
  special_.assign(vocab_size_, 0);
  for (const auto& [token, id] : vocab_) {
    std::string& t = text_[id];
    t.clear();
    if (byte_level_) {
      for (size_t i = 0; i < token.size();) {
        uint32_t cp;
        const int len = DecodeUtf8(token, i, &cp);
        const int b = cp < 324 ? bm.byte_of[cp] : -1;
        if (b >= 0) t.push_back(static_cast<char>(b));
        else t.append(token, i, len);
        i += len;
      }
    } else if (byte_fallback_ && token.size() == 6 && absl::StartsWith(token, "<0x") &&
               token[5] == '>' && byte_ids_[std::stoi(token.substr(3, 2), nullptr, 16) & 0xFF] ==
                                      id) {
      t.push_back(static_cast<char>(std::stoi(token.substr(3, 2), nullptr, 16)));
    } else {
      t = absl::StrReplaceAll(token, {{space_symbol, " "}});
    }
  }
  for (size_t i = 0; i < added_.size(); ++i) {
    text_[added_[i].id] = added_[i].content;
    special_[added_[i].id] = added_special[i];
    added_by_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
  }
  for (auto& list : added_by_byte_) {
    std::stable_sort(list.begin(), list.end(), [&](int a, int b) {
      return added_[a].content.size() > added_[b].content.size();
    });
  }

  auto find = [&](const char* name) -> int {
    for (const AddedToken& a : added_) {
      if (a.content == name) return a.id;
    }
    auto it = vocab_.find(name);
    return it == vocab_.end() ? -1 : it->second;
  };
  int bos = -1, eos = -1;
  for (const char* name : {"<s>", "<|begin_of_text|>", "<|endoftext|>"}) {
    if (bos < 0) bos = find(name);
  }
  for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>"}) {
    if (eos < 0) eos = find(name);
  }
  if (bos < 0 && eos < 0) {
    return Invalid(
        "no BOS/EOS token: expected one of <s>, </s>, <|begin_of_text|>, <|end_of_text|> or "
        "<|endoftext|> among the added tokens or in the vocab");
  }
  bos_id_ = bos >= 0 ? bos : eos;
  eos_id_ = eos >= 0 ? eos : bos;
  special_[bos_id_] = special_[eos_id_] = 1;
  return absl::OkStatus();
}

const BpeTokenizer::AddedToken* BpeTokenizer::MatchAdded(absl::string_view text,
                                                         size_t pos) const {
  for (int i : added_by_byte_[static_cast<unsigned char>(text[pos])]) {
    if (absl::StartsWith(text.substr(pos), added_[i].content)) return &added_[i];
  }
  return nullptr;
}

template <typename Fn>
void BpeTokenizer::ForEachPiece(absl::string_view segment, bool at_text_start, Fn fn) const {
  std::string s(segment);
  for (const NormOp& op : norm_) {
    if (op.prepend && !s.empty()) s.insert(0, op.to);
    if (!op.prepend && !op.from.empty()) s = absl::StrReplaceAll(s, {{op.from, op.to}});
  }
  if (s.empty()) return;
  std::vector<absl::string_view> pieces;
  if (byte_level_) {
    if (byte_level_pretok_ && add_prefix_space_ && s[0] != ' ') s.insert(0, " ");
    if (split_ == SplitStyle::kNone) pieces.push_back(s);
    else SplitPieces(s, split_ == SplitStyle::kCl100k, max_digits_, &pieces);
  } else if (metaspace_) {
    s = absl::StrReplaceAll(s, {{" ", meta_repl_}});
    if ((meta_prepend_ == 2 || (meta_prepend_ == 1 && at_text_start)) &&
        !absl::StartsWith(s, meta_repl_)) {
      s.insert(0, meta_repl_);
    }
    absl::string_view rest = s;
    while (meta_split_ && rest.size() > meta_repl_.size()) {
      const size_t next = rest.find(meta_repl_, 1);
      if (next == absl::string_view::npos) break;
      pieces.push_back(rest.substr(0, next));
      rest.remove_prefix(next);
    }
    pieces.push_back(rest);
  } else {
    pieces.push_back(s);
  }
  for (absl::string_view p : pieces) fn(p);
}

void BpeTokenizer::EncodePiece(absl::string_view piece, std::vector<int32_t>* out) const {
  std::vector<int32_t> symbols;
  if (byte_level_) {
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char c : piece) mapped += GetByteMap().symbol[c];
      auto it = vocab_.find(mapped);
      if (it != vocab_.end()) return out->push_back(it->second);
    }
    for (unsigned char c : piece) symbols.push_back(byte_ids_[c]);
  } else {
    auto it = ignore_merges_ ? vocab_.find(piece) : vocab_.end();
    if (it != vocab_.end()) return out->push_back(it->second);
    for (size_t i = 0; i < piece.size();) {
      uint32_t cp;
      const int len = DecodeUtf8(piece, i, &cp);
      auto ch = vocab_.find(piece.substr(i, len));
      if (ch != vocab_.end()) {
        symbols.push_back(ch->second);
      } else if (byte_fallback_) {
        for (int k = 0; k < len; ++k) symbols.push_back(byte_ids_[(unsigned char)piece[i + k]]);
      } else {
        symbols.push_back(unk_id_);
      }
      i += len;
    }
  }
  MergeSymbols(&symbols);
  out->insert(out->end(), symbols.begin(), symbols.end());
}

// Repeatedly merges the adjacent pair with the lowest merge rank (leftmost first among equal
// ranks), like Hugging Face's BPE, in O(n log n) with a heap of candidate pairs.
void BpeTokenizer::MergeSymbols(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& id = *symbols;
  const int n = static_cast<int>(id.size());
  if (n < 2 || merges_.empty()) return;
  struct Cand {
    int32_t rank;
    int pos;
    int32_t left, right, merged;
  };
  auto after = [](const Cand& a, const Cand& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::priority_queue<Cand, std::vector<Cand>, decltype(after)> heap(after);
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  auto push = [&](int l) {
    if (l < 0 || next[l] < 0) return;
    auto it = merges_.find(PairKey(id[l], id[next[l]]));
    if (it != merges_.end()) {
      heap.push({it->second.first, l, id[l], id[next[l]], it->second.second});
    }
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int r = next[c.pos];
    if (id[c.pos] != c.left || r < 0 || id[r] != c.right) continue;  // Stale.
    id[c.pos] = c.merged;
    id[r] = -1;
    next[c.pos] = next[r];
    if (next[r] >= 0) prev[next[r]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  int w = 0;
  for (int i = 0; i >= 0; i = next[i]) id[w++] = id[i];
  id.resize(w);
}

std::vector<int32_t> BpeTokenizer::Encode(absl::string_view text) const {
  std::vector<int32_t> ids;
  auto encode_segment = [&](size_t begin, size_t end) {
    if (end <= begin) return;
    ForEachPiece(text.substr(begin, end - begin), begin == 0,
                 [&](absl::string_view p) { EncodePiece(p, &ids); });
  };
  size_t segment = 0;
  for (size_t i = 0; i < text.size();) {
    const AddedToken* a = MatchAdded(text, i);
    if (a == nullptr) {
      ++i;
      continue;
    }
    encode_segment(segment, i);
    ids.push_back(a->id);
    i += a->content.size();
    segment = i;
  }
  encode_segment(segment, text.size());
  return ids;
}

std::vector<std::string> BpeTokenizer::PreTokenize(absl::string_view text) const {
  std::vector<std::string> pieces;
  size_t segment = 0;
  auto add_segment = [&](size_t begin, size_t end) {
    if (end <= begin) return;
    ForEachPiece(text.substr(begin, end - begin), begin == 0,
                 [&](absl::string_view p) { pieces.emplace_back(p); });
  };
  for (size_t i = 0; i < text.size();) {
    const AddedToken* a = MatchAdded(text, i);
    if (a == nullptr) {
      ++i;
      continue;
    }
    add_segment(segment, i);
    pieces.push_back(a->content);
    i += a->content.size();
    segment = i;
  }
  add_segment(segment, text.size());
  return pieces;
}

std::string BpeTokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab_size_ && !special_[id]) out += text_[id];
  }
  if (strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::string BpeTokenizer::DecodeToken(int32_t id) const {
  return id >= 0 && id < vocab_size_ ? text_[id] : "";
}

}  // namespace eellm
