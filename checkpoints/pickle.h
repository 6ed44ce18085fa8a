// Pickle reader: runs a Python pickle stream (protocols 0-5, the opcodes CPython writes) into a
// tree of PyValues without running any Python: a global (module.name) is only recorded, and a
// call of one (REDUCE, NEWOBJ) becomes an kObject holding the callable's name and its arguments,
// for the caller to interpret (checkpoints/torch_file.h turns torch's tensor rebuilds into
// tensors). collections.OrderedDict() becomes a plain dict. Persistent ids (torch's storages)
// become kPersistent values holding the id.
//
// Values are shared: the memo (PUT/GET) hands out the same node again, as Python shares the
// object, and lists and dicts are filled after they are memoized, so the tree may have cycles.
// So nodes are owned by the Pickle that read them (freed together, cycles or not; no recursion
// however deep the nesting) and link to each other by plain pointers.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace eellm {

struct PyValue;
using PyPtr = PyValue*;  // owned by the Pickle that read it

struct PyValue {
  enum class Kind {
    kNone,
    kBool,
    kInt,  // int64 range; wider Python ints are kBigInt (`str`: their bytes, or text in
           // protocol 0)
    kBigInt,
    kFloat,
    kStr,
    kBytes,
    kList,
    kTuple,
    kSet,
    kDict,
    kGlobal,      // `str` = "module.name"
    kObject,      // `str` = the callable's "module.name", `items` = its arguments
    kPersistent,  // `items`[0] = the persistent id
  };
  Kind kind = Kind::kNone;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string str;
  std::vector<PyPtr> items;                   // list, tuple, set; object arguments
  std::vector<std::pair<PyPtr, PyPtr>> dict;  // dict items, in insertion order
  PyPtr state = nullptr;                      // BUILD's state (objects; dicts' attributes)

  bool is(Kind k) const { return kind == k; }
  // The value of a dict under a string key, or nullptr (also when this is not a dict).
  const PyValue* Get(absl::string_view key) const;
  // For kObject: the value of attribute `name` in its BUILD state dict, or nullptr
  // (argparse.Namespace and plain objects keep their attributes there).
  const PyValue* Attr(absl::string_view name) const;
  // A short description for error messages: "int 3", "str 'abc'", "dict (4 items)", ...
  std::string Describe() const;
};

// The values read from one pickle; `root` is the value its STOP returned.
struct Pickle {
  std::deque<PyValue> nodes;  // a deque: pointers to its elements stay valid as it grows
  PyValue* root = nullptr;
};

// Runs the pickle in `data` to its STOP and returns the value left on the stack. Errors
// (truncated data, an unknown or unsupported opcode, a stack underflow, a bad memo key) are
// InvalidArgument naming `name`, the opcode and its offset.
absl::StatusOr<std::unique_ptr<Pickle>> ReadPickle(absl::string_view data, absl::string_view name);

}  // namespace eellm
