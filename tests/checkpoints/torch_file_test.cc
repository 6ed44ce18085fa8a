// TorchFile and the pickle reader against files CPython's pickler writes in torch.save's format
// (tests/checkpoints/torch_save.py, no PyTorch needed), value by value.
#include "checkpoints/torch_file.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;
using Kind = PyValue::Kind;

std::string Scratch(const std::string& name) {
  const fs::path dir = fs::path(EELLM_BINARY_DIR) / "tests" / "torch_file_scratch";
  fs::create_directories(dir);
  return (dir / name).string();
}

bool HavePython() { return std::system("python3 -c 'import zipfile' >/dev/null 2>&1") == 0; }

// Writes torch_save.py's basic fixture with pickle `protocol`.
std::string BasicFixture(int protocol) {
  const std::string path = Scratch(absl::StrCat("basic_p", protocol, ".pt"));
  const std::string cmd = absl::StrCat(
      "python3 ", EELLM_SOURCE_DIR, "/tests/checkpoints/torch_save.py basic ", path, " ", protocol);
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return path;
}

const PyValue& At(const PyValue& v, const std::string& key) {
  const PyValue* x = v.Get(key);
  EXPECT_NE(x, nullptr) << "no key " << key;
  static const PyValue kNone{};
  return x ? *x : kNone;
}

class TorchFileTest : public ::testing::TestWithParam<int> {};

TEST_P(TorchFileTest, ReadsEveryValueOfTheBasicFixture) {
  if (!HavePython()) GTEST_SKIP() << "python3 not found: the fixture cannot be written";
  auto file = TorchFile::Open(BasicFixture(GetParam()));
  ASSERT_TRUE(file.ok()) << file.status();
  const PyValue& root = (*file)->root();
  ASSERT_TRUE(root.is(Kind::kDict));
  EXPECT_EQ(At(root, "iteration").i, 1000);

  // argparse.Namespace: attributes in the BUILD state.
  const PyValue& args = At(root, "args");
  ASSERT_TRUE(args.is(Kind::kObject));
  EXPECT_EQ(args.str, "argparse.Namespace");
  ASSERT_NE(args.Attr("num_layers"), nullptr);
  EXPECT_EQ(args.Attr("num_layers")->i, 4);
  EXPECT_EQ(args.Attr("hidden_size")->i, 64);
  EXPECT_TRUE(args.Attr("swiglu")->is(Kind::kBool) && args.Attr("swiglu")->b);
  EXPECT_EQ(args.Attr("norm")->str, "RMSNorm");
  ASSERT_EQ(args.Attr("exit_layer_nums")->items.size(), 2u);
  EXPECT_EQ(args.Attr("exit_layer_nums")->items[1]->i, 3);
  EXPECT_EQ(args.Attr("params_dtype")->str, "torch.bfloat16");
  EXPECT_DOUBLE_EQ(args.Attr("lr")->f, 1.5e-4);
  EXPECT_TRUE(args.Attr("nothing")->is(Kind::kNone));
  EXPECT_EQ(args.Attr("missing"), nullptr);

  const PyValue& misc = At(root, "misc");
  EXPECT_TRUE(At(misc, "big").is(Kind::kBigInt));
  EXPECT_EQ(At(misc, "neg").i, -300);
  EXPECT_EQ(At(misc, "bytes").str, std::string("\x00\xff\x10", 3));
  EXPECT_TRUE(At(misc, "bytes").is(Kind::kBytes));
  const PyValue& tuple = At(misc, "tuple");
  ASSERT_EQ(tuple.items.size(), 3u);
  EXPECT_EQ(tuple.items[0]->i, 1);
  EXPECT_EQ(tuple.items[1]->str, "two");
  EXPECT_DOUBLE_EQ(tuple.items[2]->f, 3.5);
  ASSERT_EQ(At(misc, "set").items.size(), 1u);
  EXPECT_EQ(At(misc, "set").items[0]->i, 7);
  ASSERT_EQ(At(misc, "nested").items.size(), 2u);
  EXPECT_EQ(At(misc, "nested").items[0]->items[1]->i, 2);
  EXPECT_EQ(At(misc, "unicode").str, "h\xc3\xa9\xe4\xb8\x96 a\\b\n\xf0\x9f\x98\x80");
  EXPECT_TRUE(At(misc, "false").is(Kind::kBool) && !At(misc, "false").b);

  // The state dict: an OrderedDict (with torch's _metadata attribute) of tensors.
  const PyValue& sd = At(At(root, "model"), "language_model");
  ASSERT_TRUE(sd.is(Kind::kDict));
  ASSERT_EQ(sd.dict.size(), 8u);
  EXPECT_EQ(sd.dict[0].first->str, "f32");  // insertion order kept
  TorchTensorRef ref;
  ASSERT_TRUE(TorchFile::IsTensor(At(sd, "bf16"), &ref));
  EXPECT_EQ(ref.storage_type, "BFloat16Storage");
  EXPECT_EQ(ref.storage_numel, 6);
  EXPECT_EQ(ref.sizes, (std::vector<int64_t>{2, 3}));
  EXPECT_FALSE(TorchFile::IsTensor(At(root, "iteration")));

  auto read = [&](const std::string& name) {
    auto t = (*file)->ReadTensor(At(sd, name), name);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : HostTensor{};
  };
  const HostTensor f32 = read("f32");
  EXPECT_EQ(f32.shape, (Shape{3, 4}));
  for (int i = 0; i < 12; ++i) EXPECT_EQ(f32.data[i], i);
  const HostTensor tr = read("f32_t");  // element (r, c) is storage[c * 4 + r]
  EXPECT_EQ(tr.shape, (Shape{4, 3}));
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 3; ++c) EXPECT_EQ(tr.data[r * 3 + c], c * 4 + r);
  }
  EXPECT_EQ(read("f32_tail").data, (std::vector<float>{5, 6, 9, 10}));
  EXPECT_EQ(read("bf16").data, (std::vector<float>{0.5f, -1.25f, 3.0f, 1024.0f, -0.015625f, 7.0f}));
  EXPECT_EQ(read("f16").data, (std::vector<float>{0.5f, -2.0f, 65504.0f, 6.103515625e-05f}));
  EXPECT_EQ(read("f16").shape, (Shape{2, 2}));
  EXPECT_EQ(read("f64").data, (std::vector<float>{1.0f / 3.0f, -2.5f}));
  EXPECT_EQ(read("empty").shape, (Shape{0, 4}));

  // Integer tensors are refused by name; a storage pickled twice is the same persistent id.
  auto ints = (*file)->ReadTensor(At(sd, "i64"), "i64");
  ASSERT_FALSE(ints.ok());
  EXPECT_NE(ints.status().message().find("i64 is a LongStorage tensor"), std::string::npos)
      << ints.status();
  // Hostile views are refused without reading out of bounds or allocating what they claim.
  const PyValue& hostile = At(root, "hostile");
  for (const char* name : {"huge", "negative_offset", "stride", "overflow", "liar", "broadcast"}) {
    auto t = (*file)->ReadTensor(At(hostile, name), name);
    EXPECT_FALSE(t.ok()) << name;
    EXPECT_NE(t.status().message().find(name), std::string::npos) << t.status();
  }
  const PyValue& shared = At(misc, "shared");
  ASSERT_EQ(shared.items.size(), 2u);
  for (const PyPtr& p : shared.items) {
    ASSERT_TRUE(p->is(Kind::kPersistent));
    EXPECT_EQ(p->items[0]->items[2]->str, "0");  // ("storage", type, key, location, numel)
  }
}

// torch.save uses protocol 2; protocol 0 cannot hold its tuple persistent ids (pickle writes
// them as text), so it is tested with the fuzz seeds and below.
INSTANTIATE_TEST_SUITE_P(Protocols, TorchFileTest, ::testing::Values(1, 2, 4, 5));

TEST(TorchFile, RefusesFilesThatAreNotTorchSaves) {
  EXPECT_EQ(TorchFile::Open(Scratch("does_not_exist.pt")).status().code(),
            absl::StatusCode::kNotFound);
  const std::string text = Scratch("text.pt");
  std::ofstream(text) << "not a zip";
  auto s = TorchFile::Open(text).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("is not a torch.save file"), std::string::npos) << s;
  const std::string legacy = Scratch("legacy.pt");
  std::ofstream(legacy) << "\x80\x02\x8a\x0a";
  s = TorchFile::Open(legacy).status();
  EXPECT_NE(s.message().find("legacy"), std::string::npos) << s;
  if (!HavePython()) return;
  const std::string zip = Scratch("plain.zip");
  ASSERT_EQ(std::system(absl::StrCat("python3 -c \"import zipfile; zipfile.ZipFile('", zip,
                                     "', 'w').writestr('a/b.txt', 'x')\"")
                            .c_str()),
            0);
  s = TorchFile::Open(zip).status();
  EXPECT_NE(s.message().find("no <archive>/data.pkl"), std::string::npos) << s;
}

TEST(Pickle, ReportsMalformedStreamsByOpcodeAndOffset) {
  // PROTO 2, EMPTY_LIST, then the end of the data before STOP.
  auto s = ReadPickle(std::string("\x80\x02]", 3), "t").status();
  EXPECT_NE(s.message().find("ends before STOP"), std::string::npos) << s;
  // APPEND with only the list on the stack.
  s = ReadPickle(std::string("\x80\x02]a.", 5), "t").status();
  EXPECT_NE(s.message().find("stack underflow (opcode 0x61 at byte 3)"), std::string::npos) << s;
  // BINGET of a memo key never stored.
  s = ReadPickle(std::string("\x80\x02h\x05.", 5), "t").status();
  EXPECT_NE(s.message().find("memo key 5 was never stored"), std::string::npos) << s;
  // BINUNICODE longer than the data.
  s = ReadPickle(std::string("X\xff\x00\x00\x00ab.", 8), "t").status();
  EXPECT_NE(s.message().find("truncated argument"), std::string::npos) << s;
  // EXT1 (the extension registry) is not supported.
  s = ReadPickle(std::string("\x82\x01.", 3), "t").status();
  EXPECT_NE(s.message().find("unsupported opcode"), std::string::npos) << s;
  // Text protocol 0: a list of an int, a bool, a string with escapes and a unicode string.
  auto v = ReadPickle("(lp0\nI7\naI01\naS'a\\x41\\n'\np1\naVh\xe9\\u4e16\\U0001f600\np2\na.", "t");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ((*v)->root->items.size(), 4u);
  EXPECT_EQ((*v)->root->items[0]->i, 7);
  EXPECT_TRUE((*v)->root->items[1]->b);
  EXPECT_EQ((*v)->root->items[2]->str, "aA\n");
  EXPECT_EQ((*v)->root->items[3]->str, "h\xc3\xa9\xe4\xb8\x96\xf0\x9f\x98\x80");
}

}  // namespace
}  // namespace eellm
