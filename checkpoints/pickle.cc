#include "checkpoints/pickle.h"

#include <cstring>
#include <unordered_map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "engine/core/status.h"

namespace eellm {

const PyValue* PyValue::Get(absl::string_view key) const {
  if (kind != Kind::kDict) return nullptr;
  for (const auto& [k, v] : dict) {
    if (k && k->kind == Kind::kStr && k->str == key) return v;
  }
  return nullptr;
}

const PyValue* PyValue::Attr(absl::string_view name) const {
  if (kind != Kind::kObject || !state) return nullptr;
  const PyValue* s = state;
  // (dict, slots) as objects with __slots__ pickle it: the attributes are in the first.
  if (s->kind == Kind::kTuple && !s->items.empty()) s = s->items[0];
  return s ? s->Get(name) : nullptr;
}

std::string PyValue::Describe() const {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return b ? "bool True" : "bool False";
    case Kind::kInt:
      return absl::StrCat("int ", i);
    case Kind::kBigInt:
      return "int (wider than 64 bits)";
    case Kind::kFloat:
      return absl::StrCat("float ", f);
    case Kind::kStr:
      return absl::StrCat("str '", str.substr(0, 60), "'");
    case Kind::kBytes:
      return absl::StrCat("bytes (", str.size(), ")");
    case Kind::kList:
      return absl::StrCat("list (", items.size(), " items)");
    case Kind::kTuple:
      return absl::StrCat("tuple (", items.size(), " items)");
    case Kind::kSet:
      return absl::StrCat("set (", items.size(), " items)");
    case Kind::kDict:
      return absl::StrCat("dict (", dict.size(), " items)");
    case Kind::kGlobal:
      return absl::StrCat("global ", str);
    case Kind::kObject:
      return absl::StrCat("object ", str, "(...)");
    case Kind::kPersistent:
      return "persistent id";
  }
  return "?";
}

namespace {

using Kind = PyValue::Kind;

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xC0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *out += static_cast<char>(0xE0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | ((cp >> 18) & 0x07));
    *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// `n` hex digits at text[i + 2...] (after a backslash and u, U or x) as a code point, or -1.
int64_t HexAt(absl::string_view text, size_t i, int n) {
  if (i + 2 + n > text.size()) return -1;
  int64_t cp = 0;
  for (int k = 0; k < n; ++k) {
    const char c = text[i + 2 + k];
    const int v = c >= '0' && c <= '9'   ? c - '0'
                  : c >= 'a' && c <= 'f' ? c - 'a' + 10
                  : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                         : -1;
    if (v < 0) return -1;
    cp = cp * 16 + v;
  }
  return cp <= 0x10FFFF ? cp : -1;
}

// Protocol 0's UNICODE argument (raw-unicode-escape: latin-1 bytes, and backslash-u escapes of
// 4 hex digits or backslash-U of 8) as UTF-8.
std::string DecodeRawUnicodeEscape(absl::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size() && (text[i + 1] == 'u' || text[i + 1] == 'U')) {
      const int n = text[i + 1] == 'u' ? 4 : 8;
      if (const int64_t cp = HexAt(text, i, n); cp >= 0) {
        AppendUtf8(static_cast<uint32_t>(cp), &out);
        i += 1 + n;
        continue;
      }
    }
    AppendUtf8(static_cast<unsigned char>(text[i]), &out);
  }
  return out;
}

// Protocol 0's STRING argument (a quoted Python 2 string literal) as UTF-8 of its latin-1 bytes.
std::string DecodeStringLiteral(absl::string_view text) {
  if (text.size() >= 2 && (text[0] == '\'' || text[0] == '"') && text.back() == text[0]) {
    text = text.substr(1, text.size() - 2);
  }
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\\' && i + 1 < text.size()) {
      const char e = text[++i];
      c = e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : static_cast<unsigned char>(e);
      if (const int64_t v = e == 'x' ? HexAt(text, i - 1, 2) : -1; v >= 0) {
        c = static_cast<unsigned char>(v);
        i += 2;
      }
    }
    AppendUtf8(c, &out);
  }
  return out;
}

class Machine {
 public:
  Machine(absl::string_view data, absl::string_view name, Pickle* out)
      : d_(data), name_(name), out_(out) {}

  absl::StatusOr<PyPtr> Run() {
    while (true) {
      if (pos_ >= d_.size()) return Fail("the data ends before STOP");
      op_pos_ = pos_;
      op_ = static_cast<unsigned char>(d_[pos_++]);
      if (op_ == '.') {
        if (stack_.empty()) return Fail("STOP with an empty stack");
        return stack_.back();
      }
      if (absl::Status s = Step(); !s.ok()) return s;
    }
  }

 private:
  PyPtr Make(Kind k) {
    PyPtr v = &out_->nodes.emplace_back();
    v->kind = k;
    return v;
  }
  PyPtr MakeInt(int64_t i) {
    PyPtr v = Make(Kind::kInt);
    v->i = i;
    return v;
  }
  PyPtr MakeStr(Kind k, std::string s) {
    PyPtr v = Make(k);
    v->str = std::move(s);
    return v;
  }
  // A global "module.name"; protocols 0-2 spell Python 3's builtins module "__builtin__".
  PyPtr MakeGlobal(absl::string_view module, absl::string_view name) {
    if (module == "__builtin__") module = "builtins";
    return MakeStr(Kind::kGlobal, absl::StrCat(module, ".", name));
  }

  // Little-endian two's complement of n bytes (LONG1/LONG4).
  PyPtr MakeLong(const unsigned char* p, size_t n) {
    if (n > 8) return MakeStr(Kind::kBigInt, std::string(reinterpret_cast<const char*>(p), n));
    uint64_t u = 0;
    for (size_t k = 0; k < n; ++k) u |= static_cast<uint64_t>(p[k]) << (8 * k);
    if (n > 0 && n < 8 && (p[n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);  // sign-extend
    return MakeInt(static_cast<int64_t>(u));
  }

  absl::Status Fail(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrFormat("pickle %s: %s (opcode 0x%02x at byte %d)", name_, what, op_, op_pos_));
  }
  bool Need(size_t n) const { return d_.size() - pos_ >= n; }
  const unsigned char* Take(size_t n) {
    const auto* p = reinterpret_cast<const unsigned char*>(d_.data() + pos_);
    pos_ += n;
    return p;
  }
  uint64_t LittleEndian(size_t n) {
    const unsigned char* p = Take(n);
    uint64_t u = 0;
    for (size_t k = 0; k < n; ++k) u |= static_cast<uint64_t>(p[k]) << (8 * k);
    return u;
  }
  // A newline-terminated argument of the text opcodes.
  bool Line(std::string* out) {
    const size_t end = d_.find('\n', pos_);
    if (end == absl::string_view::npos) return false;
    *out = std::string(d_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return true;
  }
  absl::StatusOr<PyPtr> Pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Fail("stack underflow");
    }
    PyPtr v = stack_.back();
    stack_.pop_back();
    return v;
  }
  // The items above the topmost mark, removing them and the mark.
  absl::StatusOr<std::vector<PyPtr>> PopMark() {
    if (marks_.empty()) return Fail("no MARK on the stack");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PyPtr> items(std::make_move_iterator(stack_.begin() + m),
                             std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  absl::StatusOr<PyPtr> Top() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Fail("stack underflow");
    }
    return stack_.back();
  }
  void Push(PyPtr v) { stack_.push_back(std::move(v)); }

  // A call of `callable` with the tuple `args` (REDUCE, NEWOBJ, OBJ, INST).
  PyPtr Call(PyPtr callable, std::vector<PyPtr> args) {
    if (callable->kind == Kind::kGlobal) {
      if (callable->str == "collections.OrderedDict" && args.empty()) return Make(Kind::kDict);
      // Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
      if (callable->str == "_codecs.encode" && args.size() == 2 && args[0]->kind == Kind::kStr) {
        return MakeStr(Kind::kBytes, Latin1(args[0]->str));
      }
      // Protocols 0 and 1 build plain objects as copyreg._reconstructor(cls, base, state).
      if ((callable->str == "copy_reg._reconstructor" ||
           callable->str == "copyreg._reconstructor") &&
          !args.empty() && args[0]->kind == Kind::kGlobal) {
        return MakeStr(Kind::kObject, args[0]->str);
      }
      // Protocol 2 pickles sets as set([items]).
      if ((callable->str == "builtins.set" || callable->str == "builtins.frozenset") &&
          args.size() == 1 && args[0]->kind == Kind::kList) {
        PyPtr set = Make(Kind::kSet);
        set->items = args[0]->items;
        return set;
      }
      PyPtr o = MakeStr(Kind::kObject, callable->str);
      o->items = std::move(args);
      return o;
    }
    PyPtr o = MakeStr(Kind::kObject, "<call>");
    o->items.push_back(callable);
    for (auto& a : args) o->items.push_back(std::move(a));
    return o;
  }
  // UTF-8 text of code points below 256 -> those bytes.
  static std::string Latin1(const std::string& utf8) {
    std::string out;
    for (size_t k = 0; k < utf8.size(); ++k) {
      const auto c = static_cast<unsigned char>(utf8[k]);
      if (c < 0x80 || k + 1 >= utf8.size()) {
        out += static_cast<char>(c);
      } else {
        out +=
            static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(utf8[++k]) & 0x3f));
      }
    }
    return out;
  }
  absl::Status Memo(int64_t key) {
    ASSIGN_OR_RETURN(PyPtr top, Top());
    memo_[key] = top;
    return absl::OkStatus();
  }
  absl::Status Recall(int64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) return Fail(absl::StrCat("memo key ", key, " was never stored"));
    Push(it->second);
    return absl::OkStatus();
  }
  absl::Status SetItems(PyPtr target, std::vector<PyPtr> kv) {
    if (kv.size() % 2 != 0) return Fail("SETITEMS with an odd number of items");
    if (target->kind != Kind::kDict && target->kind != Kind::kObject) {
      return Fail(absl::StrCat("SETITEM on ", target->Describe()));
    }
    RETURN_IF_ERROR(Spend(kv.size()));
    for (size_t k = 0; k < kv.size(); k += 2) target->dict.emplace_back(kv[k], kv[k + 1]);
    return absl::OkStatus();
  }
  absl::Status Append(PyPtr target, std::vector<PyPtr> values, Kind want) {
    if (target->kind != want && target->kind != Kind::kObject) {
      return Fail(absl::StrCat("cannot add items to ", target->Describe()));
    }
    RETURN_IF_ERROR(Spend(values.size()));
    for (auto& v : values) target->items.push_back(std::move(v));
    return absl::OkStatus();
  }

  absl::Status Step();

  // Counts `n` more links between values against a budget proportional to the data, so that a
  // small pickle cannot build a huge tree (calls copy their argument tuples, and a memoized
  // tuple can be passed again and again).
  absl::Status Spend(size_t n) {
    if (n > budget_) return Fail("the pickle builds far more values than its size holds");
    budget_ -= n;
    return absl::OkStatus();
  }
  // A call's arguments, and the list a set() call copies.
  absl::Status Spend(const PyValue& args) {
    size_t n = args.items.size();
    if (!args.items.empty() && args.items[0]->kind == Kind::kList) n += args.items[0]->items.size();
    return Spend(n);
  }

  absl::string_view d_;
  absl::string_view name_;
  Pickle* out_;
  size_t pos_ = 0, op_pos_ = 0;
  unsigned char op_ = 0;
  std::vector<PyPtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<int64_t, PyPtr> memo_;
  size_t budget_ = 16 * d_.size() + (1 << 16);
};

absl::Status Machine::Step() {
  auto need = [&](size_t n) { return Need(n) ? absl::OkStatus() : Fail("truncated argument"); };
#define NEED(n) \
  if (absl::Status s = need(n); !s.ok()) return s
  std::string line;
  switch (op_) {
    case 0x80:  // PROTO
      NEED(1);
      Take(1);
      return absl::OkStatus();
    case 0x95:  // FRAME: a length hint only
      NEED(8);
      Take(8);
      return absl::OkStatus();
    case '(':  // MARK
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case '0': {  // POP
      if (!stack_.empty() && (marks_.empty() || stack_.size() > marks_.back())) {
        stack_.pop_back();
      } else if (!marks_.empty()) {
        marks_.pop_back();
      } else {
        return Fail("stack underflow");
      }
      return absl::OkStatus();
    }
    case '1': {  // POP_MARK
      ASSIGN_OR_RETURN(std::vector<PyPtr> dropped, PopMark());
      return absl::OkStatus();
    }
    case '2': {  // DUP
      ASSIGN_OR_RETURN(PyPtr top, Top());
      Push(top);
      return absl::OkStatus();
    }
    case 'N':
      Push(Make(Kind::kNone));
      return absl::OkStatus();
    case 0x88:    // NEWTRUE
    case 0x89: {  // NEWFALSE
      PyPtr v = Make(Kind::kBool);
      v->b = op_ == 0x88;
      Push(v);
      return absl::OkStatus();
    }
    case 'K':  // BININT1
      NEED(1);
      Push(MakeInt(static_cast<int64_t>(LittleEndian(1))));
      return absl::OkStatus();
    case 'M':  // BININT2
      NEED(2);
      Push(MakeInt(static_cast<int64_t>(LittleEndian(2))));
      return absl::OkStatus();
    case 'J':  // BININT
      NEED(4);
      Push(MakeInt(static_cast<int32_t>(static_cast<uint32_t>(LittleEndian(4)))));
      return absl::OkStatus();
    case 0x8a:    // LONG1
    case 0x8b: {  // LONG4
      const size_t w = op_ == 0x8a ? 1 : 4;
      NEED(w);
      const uint64_t n = LittleEndian(w);
      NEED(n);
      Push(MakeLong(Take(n), n));
      return absl::OkStatus();
    }
    case 'I':    // INT (text); "01" / "00" are True / False
    case 'L': {  // LONG (text)
      if (!Line(&line)) return Fail("truncated argument");
      if (op_ == 'I' && (line == "01" || line == "00")) {
        PyPtr v = Make(Kind::kBool);
        v->b = line == "01";
        Push(v);
        return absl::OkStatus();
      }
      int64_t i = 0;
      const absl::string_view digits = absl::StripSuffix(line, "L");
      if (absl::SimpleAtoi(digits, &i)) {
        Push(MakeInt(i));
      } else if (!digits.empty() && digits.size() > (digits[0] == '-' ? 1u : 0u) &&
                 digits.find_first_not_of("0123456789", digits[0] == '-' ? 1 : 0) ==
                     absl::string_view::npos) {
        Push(MakeStr(Kind::kBigInt, std::string(digits)));  // wider than 64 bits (as text)
      } else {
        return Fail(absl::StrCat("bad integer '", line, "'"));
      }
      return absl::OkStatus();
    }
    case 'G': {  // BINFLOAT: big-endian double
      NEED(8);
      const unsigned char* p = Take(8);
      uint64_t u = 0;
      for (int k = 0; k < 8; ++k) u = (u << 8) | p[k];
      PyPtr v = Make(Kind::kFloat);
      std::memcpy(&v->f, &u, 8);
      Push(v);
      return absl::OkStatus();
    }
    case 'F': {  // FLOAT (text)
      if (!Line(&line)) return Fail("truncated argument");
      PyPtr v = Make(Kind::kFloat);
      if (!absl::SimpleAtod(line, &v->f)) return Fail(absl::StrCat("bad float '", line, "'"));
      Push(v);
      return absl::OkStatus();
    }
    case 'X':     // BINUNICODE
    case 0x8c:    // SHORT_BINUNICODE
    case 0x8d:    // BINUNICODE8
    case 'T':     // BINSTRING (Python 2 str)
    case 'U':     // SHORT_BINSTRING
    case 'B':     // BINBYTES
    case 'C':     // SHORT_BINBYTES
    case 0x8e:    // BINBYTES8
    case 0x96: {  // BYTEARRAY8
      const size_t w = (op_ == 0x8c || op_ == 'U' || op_ == 'C')     ? 1
                       : (op_ == 0x8d || op_ == 0x8e || op_ == 0x96) ? 8
                                                                     : 4;
      NEED(w);
      const uint64_t n = LittleEndian(w);
      NEED(n);
      const bool bytes = op_ == 'B' || op_ == 'C' || op_ == 0x8e || op_ == 0x96;
      Push(MakeStr(bytes ? Kind::kBytes : Kind::kStr,
                   std::string(reinterpret_cast<const char*>(Take(n)), n)));
      return absl::OkStatus();
    }
    case 'S':    // STRING (quoted text)
    case 'V': {  // UNICODE (raw-unicode-escape text)
      if (!Line(&line)) return Fail("truncated argument");
      Push(MakeStr(Kind::kStr,
                   op_ == 'S' ? DecodeStringLiteral(line) : DecodeRawUnicodeEscape(line)));
      return absl::OkStatus();
    }
    case ')':
      Push(Make(Kind::kTuple));
      return absl::OkStatus();
    case 0x85:  // TUPLE1..3
    case 0x86:
    case 0x87: {
      const int n = op_ - 0x84;
      PyPtr t = Make(Kind::kTuple);
      t->items.resize(n);
      for (int k = n - 1; k >= 0; --k) {
        ASSIGN_OR_RETURN(PyPtr v, Pop());
        t->items[k] = std::move(v);
      }
      Push(t);
      return absl::OkStatus();
    }
    case 't':     // TUPLE
    case 'l':     // LIST
    case 0x91: {  // FROZENSET
      ASSIGN_OR_RETURN(std::vector<PyPtr> items, PopMark());
      PyPtr t = Make(op_ == 't' ? Kind::kTuple : op_ == 'l' ? Kind::kList : Kind::kSet);
      t->items = std::move(items);
      Push(t);
      return absl::OkStatus();
    }
    case ']':
      Push(Make(Kind::kList));
      return absl::OkStatus();
    case '}':
      Push(Make(Kind::kDict));
      return absl::OkStatus();
    case 0x8f:  // EMPTY_SET
      Push(Make(Kind::kSet));
      return absl::OkStatus();
    case 'd': {  // DICT
      ASSIGN_OR_RETURN(std::vector<PyPtr> kv, PopMark());
      PyPtr d = Make(Kind::kDict);
      Push(d);
      return SetItems(d, std::move(kv));
    }
    case 'a': {  // APPEND
      ASSIGN_OR_RETURN(PyPtr v, Pop());
      ASSIGN_OR_RETURN(PyPtr list, Top());
      return Append(list, {v}, Kind::kList);
    }
    case 'e': {  // APPENDS
      ASSIGN_OR_RETURN(std::vector<PyPtr> values, PopMark());
      ASSIGN_OR_RETURN(PyPtr list, Top());
      return Append(list, std::move(values), Kind::kList);
    }
    case 0x90: {  // ADDITEMS
      ASSIGN_OR_RETURN(std::vector<PyPtr> values, PopMark());
      ASSIGN_OR_RETURN(PyPtr set, Top());
      return Append(set, std::move(values), Kind::kSet);
    }
    case 's': {  // SETITEM
      ASSIGN_OR_RETURN(PyPtr v, Pop());
      ASSIGN_OR_RETURN(PyPtr k, Pop());
      ASSIGN_OR_RETURN(PyPtr d, Top());
      return SetItems(d, {k, v});
    }
    case 'u': {  // SETITEMS
      ASSIGN_OR_RETURN(std::vector<PyPtr> kv, PopMark());
      ASSIGN_OR_RETURN(PyPtr d, Top());
      return SetItems(d, std::move(kv));
    }
    case 'c': {  // GLOBAL "module\nname\n"
      std::string name;
      if (!Line(&line) || !Line(&name)) return Fail("truncated argument");
      Push(MakeGlobal(line, name));
      return absl::OkStatus();
    }
    case 0x93: {  // STACK_GLOBAL
      ASSIGN_OR_RETURN(PyPtr name, Pop());
      ASSIGN_OR_RETURN(PyPtr module, Pop());
      if (name->kind != Kind::kStr || module->kind != Kind::kStr) {
        return Fail("STACK_GLOBAL needs two strings");
      }
      Push(MakeGlobal(module->str, name->str));
      return absl::OkStatus();
    }
    case 'R':     // REDUCE: callable, args
    case 0x81:    // NEWOBJ: cls, args
    case 0x92: {  // NEWOBJ_EX: cls, args, kwargs (the keywords are dropped)
      if (op_ == 0x92) RETURN_IF_ERROR(Pop().status());
      ASSIGN_OR_RETURN(PyPtr args, Pop());
      ASSIGN_OR_RETURN(PyPtr callable, Pop());
      if (args->kind != Kind::kTuple) return Fail("call arguments are not a tuple");
      RETURN_IF_ERROR(Spend(*args));
      Push(Call(callable, args->items));
      return absl::OkStatus();
    }
    case 'o': {  // OBJ: MARK cls args...
      ASSIGN_OR_RETURN(std::vector<PyPtr> items, PopMark());
      if (items.empty()) return Fail("OBJ without a class");
      PyPtr cls = items[0];
      items.erase(items.begin());
      Push(Call(cls, std::move(items)));
      return absl::OkStatus();
    }
    case 'i': {  // INST "module\nname\n", MARK args...
      std::string name;
      if (!Line(&line) || !Line(&name)) return Fail("truncated argument");
      ASSIGN_OR_RETURN(std::vector<PyPtr> items, PopMark());
      Push(Call(MakeGlobal(line, name), std::move(items)));
      return absl::OkStatus();
    }
    case 'b': {  // BUILD
      ASSIGN_OR_RETURN(PyPtr state, Pop());
      ASSIGN_OR_RETURN(PyPtr obj, Top());
      obj->state = state;
      return absl::OkStatus();
    }
    case 'Q': {  // BINPERSID
      ASSIGN_OR_RETURN(PyPtr pid, Pop());
      PyPtr p = Make(Kind::kPersistent);
      p->items.push_back(pid);
      Push(p);
      return absl::OkStatus();
    }
    case 'P': {  // PERSID (text)
      if (!Line(&line)) return Fail("truncated argument");
      PyPtr p = Make(Kind::kPersistent);
      p->items.push_back(MakeStr(Kind::kStr, line));
      Push(p);
      return absl::OkStatus();
    }
    case 'q':  // BINPUT
      NEED(1);
      return Memo(static_cast<int64_t>(LittleEndian(1)));
    case 'r':  // LONG_BINPUT
      NEED(4);
      return Memo(static_cast<int64_t>(LittleEndian(4)));
    case 0x94:  // MEMOIZE
      return Memo(static_cast<int64_t>(memo_.size()));
    case 'p': {  // PUT (text)
      int64_t k = 0;
      if (!Line(&line) || !absl::SimpleAtoi(line, &k)) return Fail("bad PUT argument");
      return Memo(k);
    }
    case 'h':  // BINGET
      NEED(1);
      return Recall(static_cast<int64_t>(LittleEndian(1)));
    case 'j':  // LONG_BINGET
      NEED(4);
      return Recall(static_cast<int64_t>(LittleEndian(4)));
    case 'g': {  // GET (text)
      int64_t k = 0;
      if (!Line(&line) || !absl::SimpleAtoi(line, &k)) return Fail("bad GET argument");
      return Recall(k);
    }
    case 0x98:  // READONLY_BUFFER: no-op on a value already read
      return absl::OkStatus();
    default:
      // EXT1/2/4 (the extension registry), NEXT_BUFFER (out-of-band buffers) and unknown bytes.
      return Fail("unsupported opcode");
  }
#undef NEED
}

}  // namespace

absl::StatusOr<std::unique_ptr<Pickle>> ReadPickle(absl::string_view data, absl::string_view name) {
  auto out = std::make_unique<Pickle>();
  ASSIGN_OR_RETURN(out->root, Machine(data, name, out.get()).Run());
  return out;
}

}  // namespace eellm
