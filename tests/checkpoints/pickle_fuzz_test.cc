// Fuzz tests for the pickle reader (checkpoints/pickle.h), which reads untrusted checkpoint
// files: random bytes, and truncations, byte edits, opcode insertions and slice duplications of
// valid pickles (CPython's, protocols 0, 2 and 4, when python3 is present; a hand-written one
// always) must never crash, and whatever reads must be a tree whose every node can be visited.
// Deep nesting and self-reference are read without recursion and freed without leaks.
// EELLM_FUZZ_ITERATIONS and EELLM_FUZZ_SEED in the environment override the loop's defaults.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "checkpoints/pickle.h"
#include "gtest/gtest.h"
#include "tests/fuzz_env.h"

namespace eellm {
namespace {

using testing::FuzzIterations;
using testing::FuzzSeed;
using Kind = PyValue::Kind;

// Visits every node reachable from `root` once (the tree may have cycles); returns the count.
size_t Walk(const PyValue* root) {
  std::unordered_set<const PyValue*> seen;
  std::vector<const PyValue*> todo = {root};
  while (!todo.empty()) {
    const PyValue* v = todo.back();
    todo.pop_back();
    if (v == nullptr || !seen.insert(v).second) continue;
    (void)v->Describe();
    for (const PyValue* x : v->items) todo.push_back(x);
    for (const auto& [k, x] : v->dict) {
      todo.push_back(k);
      todo.push_back(x);
    }
    todo.push_back(v->state);
  }
  return seen.size();
}

// CPython's pickles of one object with most kinds of value, for protocols 0, 2 and 4.
std::vector<std::string> PythonSeeds() {
  std::vector<std::string> seeds;
  for (int proto : {0, 2, 4}) {
    const std::string cmd =
        "python3 -c \"import pickle, sys, collections, argparse; "
        "l = [1]; l.append(l); "
        "o = {'a': [1, -2, 300, 70000, -70000, 2.5, 'x', None, True, (1, 2), "
        "(1,), (1, 2, 3), (1, 2, 3, 4)], 'b': collections.OrderedDict(k=b'\\\\x00'), "
        "'c': argparse.Namespace(n=3), 'd': {5}, 'e': 2**70, 'f': frozenset([1]), "
        "'self': l}; sys.stdout.buffer.write(pickle.dumps(o, protocol=" +
        std::to_string(proto) + "))\" 2>/dev/null";
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) continue;
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    if (pclose(p) == 0 && !out.empty()) seeds.push_back(out);
  }
  return seeds;
}

TEST(PickleFuzzTest, MutatedPicklesNeverCrash) {
  // PROTO 2; {'k': [1, 'ab', None], 'g': GLOBAL m.n called with (7,)}, memoized and recalled.
  std::vector<std::string> seeds = {
      std::string("\x80\x02}q\x00(X\x01\x00\x00\x00kq\x01]q\x02(K\x01X\x02\x00\x00\x00"
                  "abNeX\x01\x00\x00\x00g"
                  "cm\nn\nK\x07\x85Rq\x03X\x01\x00\x00\x00hh\x02u.",
                  56)};
  for (const std::string& s : PythonSeeds()) seeds.push_back(s);
  for (const std::string& s : seeds) {
    auto p = ReadPickle(s, "seed");
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_TRUE((*p)->root->is(Kind::kDict));
    EXPECT_GT(Walk((*p)->root), 5u);
  }
  std::mt19937 rng(FuzzSeed(777));
  const int iterations = FuzzIterations(20000);
  int read = 0;
  for (int iter = 0; iter < iterations; ++iter) {
    const std::string& base = seeds[rng() % seeds.size()];
    std::string data;
    switch (iter % 5) {
      case 0:  // random bytes, sometimes after PROTO 2
        data = iter % 10 == 0 ? std::string("\x80\x02", 2) : "";
        for (int n = rng() % 100; n > 0; --n) data.push_back(static_cast<char>(rng()));
        break;
      case 1:  // truncated
        data = base.substr(0, rng() % base.size());
        break;
      case 2:  // bytes edited
        data = base;
        for (int n = 1 + rng() % 4; n > 0; --n)
          data[rng() % data.size()] = static_cast<char>(rng());
        break;
      case 3: {  // an opcode byte inserted
        data = base;
        const char kOps[] =
            "()]}aeuslhjqrQRbc\x81\x85\x86\x87\x8a\x8b\x93\x94\x8f\x90\x91\x92tdN.012";
        data.insert(rng() % data.size(), 1, kOps[rng() % (sizeof(kOps) - 1)]);
        break;
      }
      default: {  // a slice duplicated
        data = base;
        const size_t a = rng() % data.size(), n = rng() % 32;
        data.insert(rng() % data.size(), data.substr(a, n));
        break;
      }
    }
    auto p = ReadPickle(data, "fuzz");
    if (p.ok()) {
      ++read;
      Walk((*p)->root);
    } else {
      EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    }
  }
  EXPECT_GT(read, 0);
}

TEST(PickleFuzzTest, CallsOfAMemoizedTupleCannotBuildAHugeTree) {
  // A 1,000-item tuple memoized as 0, a global as 1, then 6,000 times: BINGET 1, BINGET 0,
  // REDUCE, POP. Each call would copy the tuple: 6 M links from 40 KB.
  using std::string_literals::operator""s;  // the opcodes hold NUL bytes
  std::string data = "\x80\x02("s;
  for (int i = 0; i < 1000; ++i) data += "K\x01"s;
  data += "tq\x00"s + "cm\nn\nq\x01"s;
  for (int i = 0; i < 6000; ++i) data += "h\x01h\x00R0"s;
  data += "N."s;
  auto p = ReadPickle(data, "calls");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("far more values than its size holds"), std::string::npos)
      << p.status();
}

TEST(PickleFuzzTest, DeepNestingAndCyclesAreReadAndFreed) {
  // 200,000 lists, each appended to the one below it: [[[...]]].
  const int depth = 200000;
  std::string data = "\x80\x02";
  for (int i = 0; i < depth; ++i) data += ']';
  for (int i = 1; i < depth; ++i) data += 'a';
  data += '.';
  auto p = ReadPickle(data, "deep");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(Walk((*p)->root), static_cast<size_t>(depth));
  // A list holding itself: EMPTY_LIST, BINPUT 0, BINGET 0, APPEND, STOP.
  auto c = ReadPickle(std::string("\x80\x02]q\x00h\x00"
                                  "a.",
                                  9),
                      "cycle");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ((*c)->root->items.size(), 1u);
  EXPECT_EQ((*c)->root->items[0], (*c)->root);
}

}  // namespace
}  // namespace eellm
