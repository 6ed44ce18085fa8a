// BpeTokenizer: Hugging Face tokenizer.json loading, hand-written GPT-2/cl100k pre-tokenization,
// rank-ordered BPE merging and decoding. See bpe_tokenizer.h for the supported subset.
#include "models/bpe_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <queue>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

using nlohmann::json;

constexpr int kMaxId = 1 << 21;  // Ids must be below this (bounds the id -> text table).
constexpr int kMaxDepth = 16;    // Nesting limit for Sequence components.
constexpr char kMetaSpace[] = "\xE2\x96\x81";  // "▁" (U+2581)

// Decodes the UTF-8 sequence at s[i] into *cp and returns its length; a stray or truncated
// sequence gives length 1 and U+FFFD (overlong forms are not rejected).
int DecodeUtf8(absl::string_view s, size_t i, uint32_t* cp) {
  const unsigned char c = s[i];
  const int len = c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF8 ? 4 : 1;
  uint32_t v = len == 1 ? c : c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    if (i + k >= s.size() || (s[i + k] & 0xC0) != 0x80) return *cp = 0xFFFD, 1;
    v = (v << 6) | (s[i + k] & 0x3F);
  }
  *cp = len == 1 && c >= 0x80 ? 0xFFFD : v;
  return len;
}

enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

struct ClassRange {
  uint32_t lo, hi;
  CharClass cls;
};

// Classes of non-ASCII code points; the first matching range wins, anything else is a letter.
constexpr ClassRange kClassRanges[] = {
    {0x85, 0x85, kSpace},      {0xA0, 0xA0, kSpace},       {0x1680, 0x1680, kSpace},
    {0x2000, 0x200A, kSpace},  {0x2028, 0x2029, kSpace},   {0x202F, 0x202F, kSpace},
    {0x205F, 0x205F, kSpace},  {0x3000, 0x3000, kSpace},   {0xB2, 0xB3, kNumber},
    {0xB9, 0xB9, kNumber},     {0xBC, 0xBE, kNumber},      {0x660, 0x669, kNumber},
    {0x6F0, 0x6F9, kNumber},   {0x966, 0x96F, kNumber},    {0x2070, 0x2070, kNumber},
    {0x2074, 0x2079, kNumber}, {0x2080, 0x2089, kNumber},  {0x2150, 0x2189, kNumber},
    {0x2460, 0x249B, kNumber}, {0x24EA, 0x24FF, kNumber},  {0x2776, 0x2793, kNumber},
    {0x3007, 0x3007, kNumber}, {0x3021, 0x3029, kNumber},  {0xFF10, 0xFF19, kNumber},
    {0xAA, 0xAA, kLetter},     {0xB5, 0xB5, kLetter},      {0xBA, 0xBA, kLetter},
    {0x3005, 0x3006, kLetter}, {0x80, 0xBF, kOther},       {0xD7, 0xD7, kOther},
    {0xE50, 0xE59, kNumber},   {0xE31, 0xE31, kOther},     {0xE34, 0xE3F, kOther},
    {0xE47, 0xE4F, kOther},    {0xE5A, 0xE5B, kOther},     {0x2100, 0x214F, kOther},
    {0xF7, 0xF7, kOther},      {0x300, 0x36F, kOther},     {0x2000, 0x206F, kOther},
    {0x20A0, 0x20FF, kOther},  {0x2190, 0x2BFF, kOther},   {0x2E00, 0x2E7F, kOther},
    {0x3001, 0x303F, kOther},  {0xD800, 0xF8FF, kOther},   {0xFE00, 0xFE6F, kOther},
    {0xFF01, 0xFF20, kOther},  {0xFF3B, 0xFF40, kOther},   {0xFF5B, 0xFF65, kOther},
    {0xFFF0, 0xFFFF, kOther},  {0x1F000, 0x1FAFF, kOther}, {0xE0000, 0x10FFFF, kOther},
};

CharClass Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return kLetter;
    if (cp >= '0' && cp <= '9') return kNumber;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return kSpace;
    return kOther;
  }
  if (cp >= 0x900 && cp < 0xE00) {  // Indic scripts share a layout: signs, letters, digits.
    const uint32_t o = cp & 0x7F;
    if (o >= 0x66 && o <= 0x6F) return kNumber;
    const bool sign = o <= 3 || (o >= 0x3A && o <= 0x57 && o != 0x3D && o != 0x50);
    if (sign || o == 0x62 || o == 0x63) return kOther;
  }
  for (const ClassRange& r : kClassRanges) {
    if (cp >= r.lo && cp <= r.hi) return r.cls;
  }
  return kLetter;
}

// GPT-2's bytes_to_unicode(): printable bytes map to themselves, the others to U+0100, U+0101...
struct ByteMap {
  std::string symbol[256];  // UTF-8 of each byte's code point.
  int byte_of[324];         // Code point -> byte, or -1.
};

const ByteMap& GetByteMap() {
  static const ByteMap* map = [] {
    auto* m = new ByteMap;
    std::fill(std::begin(m->byte_of), std::end(m->byte_of), -1);
    for (int b = 0, extra = 0; b < 256; ++b) {
      const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const int cp = keep ? b : 256 + extra++;
      m->symbol[b] = cp < 0x80 ? std::string(1, static_cast<char>(cp))
                               : std::string({static_cast<char>(0xC0 | (cp >> 6)),
                                              static_cast<char>(0x80 | (cp & 0x3F))});
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
  for (size_t i = 0, len; i < s.size(); i += len) {
    off.push_back(i);
    cp.push_back(0);
    len = DecodeUtf8(s, i, &cp.back());
    cls.push_back(Classify(cp.back()));
  }
  const size_t n = cp.size();
  off.push_back(s.size());
  auto is = [&](size_t j, CharClass c) { return j < n && cls[j] == c; };
  auto is_nl = [&](size_t j) { return j < n && (cp[j] == '\r' || cp[j] == '\n'); };
  auto run = [&](size_t j, CharClass c, size_t max = SIZE_MAX) {
    for (const size_t start = j; is(j, c) && j - start < max;) ++j;
    return j;
  };
  auto at = [&](size_t j) -> uint32_t {  // Lower-cased for cl100k's (?i:...) contractions.
    const uint32_t c = j < n ? cp[j] : 0;
    return cl100k && c >= 'A' && c <= 'Z' ? c + 32 : c;
  };
  auto match = [&](size_t i) -> size_t {
    const uint32_t a = at(i + 1), b = at(i + 2);
    if (cp[i] == '\'' && (((a == 'r' || a == 'v') && b == 'e') || (a == 'l' && b == 'l'))) {
      return i + 3;
    }
    if (cp[i] == '\'' && (a == 's' || a == 't' || a == 'm' || a == 'd')) return i + 2;
    const size_t j = cp[i] == ' ' ? i + 1 : i;
    if (!cl100k && (is(j, kLetter) || is(j, kNumber) || is(j, kOther))) return run(j, cls[j]);
    if (cl100k) {
      if (cls[i] == kLetter) return run(i, kLetter);
      if (cls[i] != kNumber && !is_nl(i) && is(i + 1, kLetter)) return run(i + 1, kLetter);
      if (cls[i] == kNumber) return run(i, kNumber, max_digits);
      if (is(j, kOther)) {
        size_t e = run(j, kOther);
        while (is_nl(e)) ++e;
        return e;
      }
      size_t last_nl = n;
      for (size_t k = i; is(k, kSpace); ++k) last_nl = is_nl(k) ? k : last_nl;
      if (last_nl < n) return last_nl + 1;
    }
    // \s+(?!\S)|\s+ : a whitespace run, less its last character when a non-space follows.
    const size_t e = std::max(run(i, kSpace), i + 1);
    return (e < n && e - i >= 2) ? e - 1 : e;
  };
  for (size_t i = 0, e; i < n; i = e) {
    e = match(i);
    out->push_back(s.substr(off[i], off[e] - off[i]));
  }
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

absl::Status Invalid(absl::string_view what) { return absl::InvalidArgumentError(what); }

}  // namespace

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  return FromJson(std::string(std::istreambuf_iterator<char>(f), {}), path);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromJson(absl::string_view json_text,
                                                                     const std::string& name) {
  std::unique_ptr<BpeTokenizer> tok(new BpeTokenizer());
  tok->name_ = name;
  absl::Status status;
  try {
    status = tok->Parse(json::parse(json_text.begin(), json_text.end()));
  } catch (const json::parse_error& e) {
    status = Invalid(absl::StrCat("malformed JSON: ", std::string(e.what()).substr(0, 200)));
  } catch (const json::exception& e) {  // A field of the wrong type.
    status = Invalid(absl::StrCat("unexpected JSON content: ", e.what()));
  }
  if (!status.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", status.message()));
  return tok;
}

absl::Status BpeTokenizer::Parse(const json& j) {
  if (!j.is_object()) return Invalid("the top level is not a JSON object");
  auto model = j.find("model");
  if (model == j.end() || !model->is_object()) return Invalid("missing \"model\" object");
  const std::string type = model->value("type", "BPE");
  if (type != "BPE") {
    return Invalid(absl::StrCat("model.type \"", type, "\" is not supported (only \"BPE\")"));
  }
  auto vocab = model->find("vocab");
  if (vocab == model->end() || !vocab->is_object() || vocab->empty()) {
    return Invalid("missing or empty model.vocab (expected an object of token -> id)");
  }
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it->is_number_integer() || *it < 0 || *it >= kMaxId) {
      return Invalid(absl::StrCat("model.vocab[\"", it.key(), "\"] is ", it->dump(),
                                  ", not an id in [0, ", kMaxId, ")"));
    }
    vocab_[it.key()] = it->get<int32_t>();
  }
  auto merges = model->find("merges");
  if (merges == model->end() || !merges->is_array()) {
    return Invalid("missing model.merges (expected an array of \"a b\" or [a, b])");
  }
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    std::vector<std::string> ab;
    if (m.is_string()) ab = absl::StrSplit(m.get<std::string>(), ' ');
    if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) ab = {m[0], m[1]};
    if (ab.size() != 2) ab = {"", ""};  // Rejected below.
    auto a = vocab_.find(ab[0]), b = vocab_.find(ab[1]), merged = vocab_.find(ab[0] + ab[1]);
    if (ab[0].empty() || ab[1].empty() || a == vocab_.end() || b == vocab_.end() ||
        merged == vocab_.end()) {
      return Invalid(absl::StrCat("model.merges[", i, "] = ", m.dump(),
                                  " is not \"a b\" or [a, b] of tokens in model.vocab"));
    }
    merges_[PairKey(a->second, b->second)] = {static_cast<int32_t>(i), merged->second};
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json f = model->value(key, json());
    if (!f.is_null() && f != "") return Invalid(absl::StrCat("model.", key, " is not supported"));
  }
  byte_fallback_ = model->value("byte_fallback", false);
  ignore_merges_ = model->value("ignore_merges", false);
  const json unk = model->value("unk_token", json());
  auto unk_it = vocab_.find(unk.is_string() ? unk.get<std::string>() : "");
  if (unk.is_string() && unk_it != vocab_.end()) unk_id_ = unk_it->second;
  const json added = j.value("added_tokens", json::array());
  for (size_t i = 0; i < added.size(); ++i) {
    const json& a = added[i];
    const int64_t id = a.value("id", int64_t{-1});
    const std::string content = a.value("content", "");
    if (id < 0 || id >= kMaxId || content.empty()) {
      return Invalid(absl::StrCat("added_tokens[", i, "] needs an \"id\" in [0, ", kMaxId,
                                  ") and a non-empty \"content\""));
    }
    added_.push_back({content, static_cast<int32_t>(id), a.value("special", false)});
  }
  RETURN_IF_ERROR(ParseStep(j.value("normalizer", json()), "normalizer", 0));
  RETURN_IF_ERROR(ParseStep(j.value("pre_tokenizer", json()), "pre_tokenizer", 0));
  byte_level_ = byte_level_pretok_ ||
                absl::StrContains(j.value("decoder", json()).dump(), "\"type\":\"ByteLevel\"");
  return Finish();
}

// Parses a normalizer or pre-tokenizer (`where` says which), recursing into Sequences.
absl::Status BpeTokenizer::ParseStep(const json& c, const char* where, int depth) {
  if (c.is_null()) return absl::OkStatus();
  if (!c.is_object() || depth > kMaxDepth) return Invalid(absl::StrCat(where, " is not valid"));
  const std::string type = c.value("type", "");
  const json pattern = c.value("pattern", json::object());
  if (type == "Sequence") {
    const json list = c.value(c.contains("normalizers") ? "normalizers" : "pretokenizers", json());
    if (!list.is_array()) return Invalid(absl::StrCat(where, " Sequence has no list"));
    for (const json& item : list) RETURN_IF_ERROR(ParseStep(item, where, depth + 1));
  } else if (type == "Prepend") {
    norm_.push_back({true, "", c.value("prepend", "")});
  } else if (type == "Replace" && pattern.contains("String")) {
    norm_.push_back({false, pattern["String"].get<std::string>(), c.value("content", "")});
  } else if (type == "ByteLevel") {
    byte_level_pretok_ = true;
    add_prefix_space_ = c.value("add_prefix_space", true);
    if (c.value("use_regex", true) && split_ == SplitStyle::kNone) split_ = SplitStyle::kGpt2;
  } else if (type == "Split" && pattern.contains("Regex")) {
    const std::string re = pattern["Regex"].get<std::string>();
    const bool cl100k = absl::StrContains(re, R"([^\r\n\p{L}\p{N}]?\p{L}+)");
    split_ = cl100k ? SplitStyle::kCl100k : SplitStyle::kGpt2;
    max_digits_ = absl::StrContains(re, R"(\p{N}{1,3})") ? 3 : 1;
  } else if (type == "Metaspace") {
    metaspace_ = true;
    meta_repl_ = c.value("replacement", kMetaSpace);
    if (meta_repl_.empty()) return Invalid("Metaspace has an empty replacement");
    const bool legacy_prepend = c.value("add_prefix_space", true);
    const std::string scheme = c.value("prepend_scheme", legacy_prepend ? "always" : "never");
    meta_prepend_ = scheme == "never" ? 0 : (scheme == "first" ? 1 : 2);
    meta_split_ = c.value("split", true);
  } else if (type != "NFC" && type != "NFD" && type != "NFKC" && type != "NFKD") {
    return Invalid(absl::StrCat(where, " type \"", type, "\" is not supported",
                                type == "Replace" || type == "Split" ? " with this pattern" : ""));
  }
  return absl::OkStatus();
}

// Checks the flavour's requirements and builds the id tables.
absl::Status BpeTokenizer::Finish() {
  std::string space = metaspace_ ? meta_repl_ : kMetaSpace;
  bool prepends = metaspace_ && meta_prepend_ > 0;
  for (const NormOp& op : norm_) {
    if (!op.prepend && op.from == " " && !op.to.empty()) space = op.to;
    prepends |= op.prepend && op.to == space;
  }
  if (!byte_level_ && !metaspace_ && !byte_fallback_ && !prepends) {
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
      return Invalid(absl::StrFormat("model.vocab lacks the token \"%s\" for byte 0x%02X", sym, b));
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
  special_.assign(vocab_size_, 0);
  for (const auto& [token, id] : vocab_) {
    std::string& t = text_[id];
    t = byte_level_ ? "" : absl::StrReplaceAll(token, {{space, " "}});
    for (size_t i = 0, len; byte_level_ && i < token.size(); i += len) {
      uint32_t cp;
      len = DecodeUtf8(token, i, &cp);
      const int b = cp < 324 ? bm.byte_of[cp] : -1;
      t += b >= 0 ? std::string(1, static_cast<char>(b)) : token.substr(i, len);
    }
  }
  for (int b = 0; b < 256 && byte_fallback_ && !byte_level_; ++b) {
    text_[byte_ids_[b]] = std::string(1, static_cast<char>(b));
  }
  std::stable_sort(added_.begin(), added_.end(), [](const AddedToken& a, const AddedToken& b) {
    return a.content.size() > b.content.size();  // MatchAdded() prefers the longest.
  });
  for (size_t i = 0; i < added_.size(); ++i) {
    text_[added_[i].id] = added_[i].content;
    special_[added_[i].id] = added_[i].special;
    added_by_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
  }
  auto find = [&](std::initializer_list<const char*> names) {
    for (const char* name : names) {
      auto a = std::find_if(added_.begin(), added_.end(),
                            [&](const AddedToken& t) { return t.content == name; });
      if (a != added_.end()) return a->id;
      if (vocab_.contains(name)) return vocab_.at(name);
    }
    return -1;
  };
  const int bos = find({"<s>", "<|begin_of_text|>", "<|endoftext|>"});
  const int eos = find({"</s>", "<|end_of_text|>", "<|endoftext|>"});
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

const BpeTokenizer::AddedToken* BpeTokenizer::MatchAdded(absl::string_view text, size_t pos) const {
  for (int i : added_by_byte_[static_cast<unsigned char>(text[pos])]) {
    if (absl::StartsWith(text.substr(pos), added_[i].content)) return &added_[i];
  }
  return nullptr;
}

std::vector<int32_t> BpeTokenizer::Encode(absl::string_view text) const {
  std::vector<int32_t> ids, symbols;
  std::vector<absl::string_view> parts;
  const AddedToken* added = nullptr;
  for (size_t segment = 0, i; segment < text.size(); segment = i + added->content.size()) {
    for (i = segment; i < text.size() && (added = MatchAdded(text, i)) == nullptr;) ++i;
    // text[segment, i) holds no added token: normalize, pre-tokenize and encode it.
    std::string s(text.substr(segment, i - segment));
    for (const NormOp& op : norm_) {
      if (op.prepend && !s.empty()) s.insert(0, op.to);
      if (!op.prepend && !op.from.empty()) s = absl::StrReplaceAll(s, {{op.from, op.to}});
    }
    if (byte_level_pretok_ && add_prefix_space_ && !s.empty() && s[0] != ' ') s.insert(0, " ");
    if (metaspace_ && !s.empty()) {
      s = absl::StrReplaceAll(s, {{" ", meta_repl_}});
      const bool prepend = meta_prepend_ == 2 || (meta_prepend_ == 1 && segment == 0);
      if (prepend && !absl::StartsWith(s, meta_repl_)) s.insert(0, meta_repl_);
    }
    parts.clear();
    if (split_ != SplitStyle::kNone) {
      SplitPieces(s, split_ == SplitStyle::kCl100k, max_digits_, &parts);
    } else if (metaspace_ && meta_split_) {  // Split before each replacement character.
      for (size_t start = 0, next; start < s.size(); start = next) {
        next = std::min(s.find(meta_repl_, start + 1), s.size());
        parts.push_back(absl::string_view(s).substr(start, next - start));
      }
    } else if (!s.empty()) {
      parts.push_back(s);
    }
    for (absl::string_view p : parts) EncodePiece(p, &symbols, &ids);
    if (added == nullptr) break;
    ids.push_back(added->id);
  }
  return ids;
}

void BpeTokenizer::EncodePiece(absl::string_view piece, std::vector<int32_t>* symbols,
                               std::vector<int32_t>* out) const {
  symbols->clear();
  if (ignore_merges_) {  // A piece that is itself a token is not merged.
    std::string mapped;
    for (unsigned char c : piece)
      mapped += byte_level_ ? GetByteMap().symbol[c] : std::string(1, c);
    if (auto it = vocab_.find(mapped); it != vocab_.end()) return out->push_back(it->second);
  }
  for (size_t i = 0, len; i < piece.size(); i += len) {
    uint32_t cp;
    len = byte_level_ ? 1 : DecodeUtf8(piece, i, &cp);
    auto it = byte_level_ ? vocab_.end() : vocab_.find(piece.substr(i, len));
    if (it != vocab_.end() || (!byte_level_ && !byte_fallback_)) {
      symbols->push_back(it != vocab_.end() ? it->second : unk_id_);
      continue;
    }
    for (size_t k = i; k < i + len; ++k) symbols->push_back(byte_ids_[(unsigned char)piece[k]]);
  }
  MergeSymbols(symbols);
  out->insert(out->end(), symbols->begin(), symbols->end());
}

// Repeatedly merges the adjacent pair with the lowest merge rank (leftmost first among equal
// ranks), like Hugging Face's BPE, in O(n log n) with a heap of candidate pairs.
void BpeTokenizer::MergeSymbols(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& id = *symbols;
  const int n = static_cast<int>(id.size());
  if (n < 2 || merges_.empty()) return;
  // (rank, left position, left id, right id, merged id), smallest first.
  using Cand = std::tuple<int32_t, int, int32_t, int32_t, int32_t>;
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  auto push = [&](int l) {
    if (l < 0 || next[l] < 0) return;
    auto it = merges_.find(PairKey(id[l], id[next[l]]));
    if (it == merges_.end()) return;
    heap.emplace(it->second.first, l, id[l], id[next[l]], it->second.second);
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const auto [rank, l, left, right, merged] = heap.top();
    heap.pop();
    const int r = next[l];
    if (id[l] != left || r < 0 || id[r] != right) continue;  // Stale candidate.
    id[l] = merged;
    id[r] = -1;
    next[l] = next[r];
    if (next[l] >= 0) prev[next[l]] = l;
    push(prev[l]);
    push(l);
  }
  int w = 0;
  for (int i = 0; i >= 0; i = next[i]) id[w++] = id[i];
  id.resize(w);
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
