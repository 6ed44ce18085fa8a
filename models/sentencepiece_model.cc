#include "models/sentencepiece_model.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace eellm {

namespace {

// sentencepiece_model.proto's SentencePiece.Type.
enum PieceType {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

struct Piece {
  std::string text;
  float score = 0;
  int type = kNormal;
};

// A protocol buffer message's fields, read one at a time.
class WireReader {
 public:
  explicit WireReader(absl::string_view bytes) : p_(bytes) {}
  bool done() const { return p_.empty(); }
  // The next field's number and wire type; false on malformed input.
  bool Next(uint32_t* field, uint32_t* wire) {
    uint64_t key;
    if (!Varint(&key)) return false;
    *field = static_cast<uint32_t>(key >> 3);
    *wire = static_cast<uint32_t>(key & 7);
    return *field > 0;
  }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_.empty()) return false;
      const uint8_t b = static_cast<uint8_t>(p_[0]);
      p_.remove_prefix(1);
      *v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  bool Bytes(absl::string_view* out) {
    uint64_t n;
    if (!Varint(&n) || n > p_.size()) return false;
    *out = p_.substr(0, n);
    p_.remove_prefix(n);
    return true;
  }
  bool Fixed32(uint32_t* v) {
    if (p_.size() < 4) return false;
    uint8_t b[4];
    std::memcpy(b, p_.data(), 4);
    *v = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    p_.remove_prefix(4);
    return true;
  }
  // Skips a field of wire type `wire`; false for groups and malformed input.
  bool Skip(uint32_t wire) {
    uint64_t v;
    uint32_t f;
    absl::string_view s;
    switch (wire) {
      case 0:
        return Varint(&v);
      case 1:
        if (p_.size() < 8) return false;
        p_.remove_prefix(8);
        return true;
      case 2:
        return Bytes(&s);
      case 5:
        return Fixed32(&f);
      default:
        return false;
    }
  }

 private:
  absl::string_view p_;
};

struct Model {
  std::vector<Piece> pieces;
  uint64_t model_type = 1;  // UNIGRAM unless the trainer spec says otherwise
  std::string normalizer = "";
  bool add_dummy_prefix = true, remove_extra_whitespaces = true;
};

// Whether `s` is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool ValidUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (int k = 1; k < n; ++k) {
      const uint8_t t = static_cast<uint8_t>(s[i + k]);
      if ((t & 0xC0) != 0x80) return false;
      cp = cp << 6 | (t & 0x3F);
    }
    const uint32_t least[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < least[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

bool ParsePiece(absl::string_view bytes, Piece* piece) {
  WireReader r(bytes);
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.Next(&field, &wire)) return false;
    absl::string_view s;
    uint32_t f;
    uint64_t v;
    if (field == 1 && wire == 2) {
      if (!r.Bytes(&s)) return false;
      piece->text = std::string(s);
    } else if (field == 2 && wire == 5) {
      if (!r.Fixed32(&f)) return false;
      std::memcpy(&piece->score, &f, sizeof(float));
    } else if (field == 3 && wire == 0) {
      if (!r.Varint(&v)) return false;
      piece->type = static_cast<int>(v);
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

// Reads the varint fields of a sub-message: `on(field, value)` for each; strings through
// `on_bytes(field, bytes)`.
template <typename V, typename B>
bool ParseFields(absl::string_view bytes, V on, B on_bytes) {
  WireReader r(bytes);
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.Next(&field, &wire)) return false;
    uint64_t v;
    absl::string_view s;
    if (wire == 0) {
      if (!r.Varint(&v)) return false;
      on(field, v);
    } else if (wire == 2) {
      if (!r.Bytes(&s)) return false;
      on_bytes(field, s);
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

bool ParseModel(absl::string_view bytes, Model* m) {
  WireReader r(bytes);
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.Next(&field, &wire)) return false;
    absl::string_view s;
    if (wire != 2) {
      if (!r.Skip(wire)) return false;
      continue;
    }
    if (!r.Bytes(&s)) return false;
    if (field == 1) {  // pieces
      Piece p;
      if (!ParsePiece(s, &p)) return false;
      m->pieces.push_back(std::move(p));
    } else if (field == 2) {  // trainer_spec
      if (!ParseFields(
              s,
              [&](uint32_t f, uint64_t v) {
                if (f == 3) m->model_type = v;
              },
              [](uint32_t, absl::string_view) {})) {
        return false;
      }
    } else if (field == 3) {  // normalizer_spec
      if (!ParseFields(
              s,
              [&](uint32_t f, uint64_t v) {
                if (f == 3) m->add_dummy_prefix = v != 0;
                if (f == 4) m->remove_extra_whitespaces = v != 0;
              },
              [&](uint32_t f, absl::string_view name) {
                if (f == 1) m->normalizer = std::string(name);
              })) {
        return false;
      }
    }
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> SentencePieceToTokenizerJson(absl::string_view model_bytes,
                                                         const std::string& name) {
  auto bad = [&](auto... parts) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", parts...));
  };
  Model m;
  if (!ParseModel(model_bytes, &m) || m.pieces.empty()) {
    return bad("not a SentencePiece model (a ModelProto with pieces)");
  }
  if (m.model_type != 2) {
    return bad("model_type ", m.model_type == 1 ? "UNIGRAM" : absl::StrCat(m.model_type),
               " is not supported (BPE models only, as Llama-2's and Mistral's)");
  }
  if (!ValidUtf8(m.normalizer)) return bad("the normalizer's name is not valid UTF-8");
  if (m.normalizer != "identity") {
    return bad("normalizer \"", m.normalizer,
               "\" is not supported (the identity normalizer only, as Llama-2's)");
  }
  if (m.remove_extra_whitespaces) {
    return bad("remove_extra_whitespaces is set: collapsing whitespace is not supported");
  }
  const std::string kSpace = "\xE2\x96\x81";  // "▁"
  nlohmann::json vocab = nlohmann::json::object();
  absl::flat_hash_map<std::string, int> ids;
  nlohmann::json added = nlohmann::json::array();
  std::string unk;
  bool bytes = false;
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    const Piece& p = m.pieces[i];
    if (p.text.empty()) return bad("piece ", i, " is empty");
    if (!ValidUtf8(p.text)) return bad("piece ", i, " is not valid UTF-8");
    if (!ids.emplace(p.text, static_cast<int>(i)).second) {
      return bad("piece \"", p.text, "\" appears twice (ids ", ids[p.text], " and ", i, ")");
    }
    vocab[p.text] = i;
    if (p.type == kUnknown) unk = p.text;
    bytes |= p.type == kByte;
    if (p.type == kUnknown || p.type == kControl || p.type == kUserDefined) {
      added.push_back({{"id", i},
                       {"content", p.text},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", p.type != kUserDefined}});
    }
  }
  // Merges: every split of a piece (at a character boundary) into two pieces, ordered by the
  // piece's score (highest first), then by the piece's id, then by the halves' ids.
  struct Merge {
    int left, right;
    float score;
  };
  std::vector<Merge> merges;
  for (const Piece& p : m.pieces) {
    std::vector<Merge> local;
    for (size_t at = 1; at < p.text.size(); ++at) {
      if ((static_cast<uint8_t>(p.text[at]) & 0xC0) == 0x80) continue;  // inside a character
      auto l = ids.find(p.text.substr(0, at));
      auto r = ids.find(p.text.substr(at));
      if (l != ids.end() && r != ids.end()) local.push_back({l->second, r->second, p.score});
    }
    std::sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) {
      return a.left != b.left ? a.left < b.left : a.right < b.right;
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(),
                   [](const Merge& a, const Merge& b) { return a.score > b.score; });
  nlohmann::json merge_list = nlohmann::json::array();
  for (const Merge& x : merges) {
    merge_list.push_back(absl::StrCat(m.pieces[x.left].text, " ", m.pieces[x.right].text));
  }
  nlohmann::json j;
  j["version"] = "1.0";
  j["added_tokens"] = std::move(added);
  nlohmann::json replace = {
      {"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}};
  j["normalizer"] =
      m.add_dummy_prefix
          ? nlohmann::json{{"type", "Sequence"},
                           {"normalizers", {{{"type", "Prepend"}, {"prepend", kSpace}}, replace}}}
          : replace;
  j["pre_tokenizer"] = nullptr;
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", kSpace}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"},
                     {"content", " "},
                     {"start", m.add_dummy_prefix ? 1 : 0},
                     {"stop", 0}}}}};
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", unk.empty() ? nlohmann::json(nullptr) : nlohmann::json(unk)},
                {"fuse_unk", true},
                {"byte_fallback", bytes},
                {"vocab", std::move(vocab)},
                {"merges", std::move(merge_list)}};
  return j.dump();
}

absl::StatusOr<std::string> SentencePieceFileToTokenizerJson(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  const std::string bytes(std::istreambuf_iterator<char>(f), {});
  return SentencePieceToTokenizerJson(bytes, path);
}

}  // namespace eellm
