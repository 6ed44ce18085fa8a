// `eellm convert` and `eellm logits` end to end: Hugging Face safetensors (sharded) -> eellm
// (split for a parallel layout) -> Hugging Face is bit-exact, the converted model's logits equal
// the source model's, bf16 export rounds as specified, add-exits / set-exit-position / reshard
// write loadable checkpoints, and malformed inputs fail naming the file.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoints/safetensors.h"
#include "engine/core/dtype.h"
#include "gtest/gtest.h"
#include "launch/exit_surgery.h"
#include "launch/hf_convert.h"
#include "launch/model_loader.h"
#include "nlohmann/json.hpp"
#include "tests/launch/run_eellm.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;
using testing::CmdResult;
using testing::Describe;
using testing::Quote;
using testing::RunEellm;

ModelConfig TinyLlama() {
  ModelConfig c = testing::TinyConfig(ModelStyle::kLlama, 4);
  c.vocab_size = 16;
  c.num_heads = 4;
  c.num_kv_heads = 2;  // GQA
  c.hidden_size = 16;
  c.exits = {ExitConfig{}};
  c.exits[0].layer = 2;
  c.exits[0].kind = ExitKind::kNorm;
  return c;
}

class ConvertTest : public ::testing::Test {
 protected:
  void SetUp() override {
    be_ = testing::Cpu();
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::path(::testing::TempDir()) /
            absl::StrCat("eellm_convert_", getpid(), "_", info->name()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    config_ = TinyLlama();
    auto m = Model::Create(config_, be_.get());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    testing::FillParams(*model_, 5);
    auto hf = EellmToHf(config_, ParamsToHost(model_->params()));
    ASSERT_TRUE(hf.ok()) << hf.status();
    hf_ = *std::move(hf);
    // A sharded Hugging Face directory (several safetensors files and an index).
    ASSERT_TRUE(WriteSafetensorsModel(Path("hf"), hf_, StDtype::kF32, 4096).ok());
    std::ofstream(Path("hf/config.json")) << HfConfigFromModel(config_).dump(2);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  CmdResult Run(const std::string& args) {
    CmdResult r = RunEellm(args);
    EXPECT_EQ(r.exit_code, 0) << Describe(args, r);
    return r;
  }

  std::unique_ptr<Backend> be_;
  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Model> model_;
  HostTensorMap hf_;
};

void ExpectSameMaps(const HostTensorMap& a, const HostTensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_NE(it, b.end()) << name;
    EXPECT_EQ(it->second.shape, t.shape) << name;
    ASSERT_EQ(it->second.data.size(), t.data.size()) << name;
    EXPECT_EQ(std::memcmp(it->second.data.data(), t.data.data(), t.data.size() * sizeof(float)), 0)
        << name;
  }
}

TEST_F(ConvertTest, HfToEellmToHfIsBitExactAndLogitsMatch) {
  EXPECT_GT(std::distance(fs::directory_iterator(Path("hf")), fs::directory_iterator()), 3)
      << "the fixture should be a sharded safetensors directory";
  Run("convert hf-to-eellm --input=" + Quote(Path("hf")) + " --output=" + Quote(Path("run")) +
      " --tp=2 --pp=2");
  EXPECT_TRUE(fs::exists(Path("run/step_00000000/shard_tp1_pp1.h5")));
  // eellm -> the same tensors as the source model, bit for bit.
  auto loaded = LoadModelFromCheckpoint(Path("run"), be_.get());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameMaps(ParamsToHost(model_->params()), ParamsToHost(loaded->model->params()));
  EXPECT_EQ(loaded->model->params().grad_size(), 0u);  // loaded for inference: no gradients
  auto with_moments = LoadModelFromCheckpoint(Path("run"), be_.get(), /*with_optimizer=*/true);
  ASSERT_TRUE(with_moments.ok()) << with_moments.status();
  EXPECT_EQ(with_moments->model->params().grad_size(), with_moments->model->params().padded_size());
  // And back to safetensors.
  Run("convert eellm-to-hf --input=" + Quote(Path("run")) + " --output=" + Quote(Path("hf2")));
  auto back = ReadSafetensorsModel(Path("hf2"));
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameMaps(hf_, back->tensors);
  // The logits printed by `eellm logits` equal the source model's, for the final head and exit.
  const std::vector<int32_t> ids = {3, 1, 4, 1, 5, 9, 2, 6};
  for (int head : {-1, 0}) {
    CmdResult r = Run("logits --checkpoint=" + Quote(Path("run")) +
                      " --tokens=3,1,4,1,5,9,2,6 --exit=" + std::to_string(head));
    auto j = nlohmann::json::parse(r.output, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << r.output;
    auto want = HeadLogits(*model_, ids, head);
    ASSERT_TRUE(want.ok()) << want.status();
    const auto& rows = j["logits"];
    ASSERT_EQ(rows.size(), ids.size());
    for (size_t t = 0; t < ids.size(); ++t) {
      for (int v = 0; v < config_.vocab_size; ++v) {
        EXPECT_FLOAT_EQ(rows[t][v].get<float>(), (*want)[t * config_.vocab_size + v])
            << "head " << head << " position " << t << " token " << v;
      }
    }
  }
}

TEST_F(ConvertTest, Bf16ExportRoundsToNearestEven) {
  Run("convert hf-to-eellm --input=" + Quote(Path("hf")) + " --output=" + Quote(Path("run")));
  Run("convert eellm-to-hf --input=" + Quote(Path("run")) + " --output=" + Quote(Path("hf16")) +
      " --dtype=bf16");
  auto back = ReadSafetensorsModel(Path("hf16"));
  ASSERT_TRUE(back.ok()) << back.status();
  for (const auto& [name, t] : hf_) {
    EXPECT_EQ(back->dtypes.at(name), StDtype::kBF16) << name;
    const std::vector<float>& got = back->tensors.at(name).data;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_EQ(got[i], Bf16ToFloat(FloatToBf16(t.data[i]))) << name << "[" << i << "]";
    }
  }
  std::ifstream in(Path("hf16/config.json"));
  EXPECT_EQ(nlohmann::json::parse(in)["torch_dtype"], "bfloat16");
}

TEST_F(ConvertTest, AddExitsSetPositionAndReshard) {
  Run("convert hf-to-eellm --input=" + Quote(Path("hf")) + " --output=" + Quote(Path("run")));
  Run("convert add-exits --input=" + Quote(Path("run")) + " --output=" + Quote(Path("tuned")) +
      " --exits='[{\"layer\": 3, \"kind\": \"norm\"}]' --init=copy-final --tp=2");
  auto tuned = LoadModelFromCheckpoint(Path("tuned"), be_.get());
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  ASSERT_EQ(tuned->config.exits.size(), 2u);
  EXPECT_EQ(tuned->config.exits[1].layer, 3);
  // copy-final: the new exit's norm and head are the final norm and output weight.
  const ParamStore& ps = tuned->model->params();
  auto same = [&](const std::string& a, const std::string& b) {
    const int i = ps.Find(a), j = ps.Find(b);
    EXPECT_GE(i, 0) << a;
    EXPECT_GE(j, 0) << b;
    if (i < 0 || j < 0) return;
    EXPECT_EQ(std::memcmp(ps.param(i), ps.param(j), ps.params()[i].numel * sizeof(float)), 0)
        << a << " vs " << b;
  };
  same("exits.1.norm.weight", "final_norm.weight");
  same("exits.1.head.weight", "output.weight");
  // Move the new exit to pre-layer 4 (same depth): only the config changes.
  Run("convert set-exit-position --input=" + Quote(Path("tuned")) +
      " --output=" + Quote(Path("moved")) + " --exit=1 --position=pre");
  auto moved = LoadModelFromCheckpoint(Path("moved"), be_.get());
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->config.exits[1].layer, 4);
  EXPECT_EQ(moved->config.exits[1].position, ExitPosition::kPre);
  ExpectSameMaps(ParamsToHost(tuned->model->params()), ParamsToHost(moved->model->params()));
  // Reshard for pp 2: the same tensors.
  Run("convert reshard --input=" + Quote(Path("moved")) + " --output=" + Quote(Path("pp2")) +
      " --pp=2");
  EXPECT_TRUE(fs::exists(Path("pp2/step_00000000/shard_tp0_pp1.h5")));
  auto pp2 = LoadModelFromCheckpoint(Path("pp2"), be_.get());
  ASSERT_TRUE(pp2.ok()) << pp2.status();
  ExpectSameMaps(ParamsToHost(moved->model->params()), ParamsToHost(pp2->model->params()));
}

TEST_F(ConvertTest, MalformedInputsNameTheFile) {
  // A safetensors header length larger than the file.
  fs::create_directories(Path("bad"));
  fs::copy_file(Path("hf/config.json"), Path("bad/config.json"));
  {
    std::ofstream f(Path("bad/model.safetensors"), std::ios::binary);
    const uint64_t n = 1 << 20;
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << "{\"a\": 1}";
  }
  std::string args =
      "convert hf-to-eellm --input=" + Quote(Path("bad")) + " --output=" + Quote(Path("out"));
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(Path("bad/model.safetensors")), std::string::npos) << Describe(args, r);
  EXPECT_FALSE(fs::exists(Path("out/latest")));
  // A missing tensor: the HF name is given.
  HostTensorMap partial = hf_;
  partial.erase("model.layers.1.mlp.up_proj.weight");
  ASSERT_TRUE(WriteSafetensorsModel(Path("partial"), partial, StDtype::kF32).ok());
  fs::copy_file(Path("hf/config.json"), Path("partial/config.json"));
  args = "convert hf-to-eellm --input=" + Quote(Path("partial")) + " --output=" + Quote(Path("o2"));
  r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("model.layers.1.mlp.up_proj.weight"), std::string::npos)
      << Describe(args, r);
  // Unknown mode and an unsupported config value.
  r = RunEellm("convert sideways --input=x --output=y");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("sideways"), std::string::npos) << r.output;
  nlohmann::json config = HfConfigFromModel(config_);
  config["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  std::ofstream(Path("hf/config.json")) << config.dump();
  args = "convert hf-to-eellm --input=" + Quote(Path("hf")) + " --output=" + Quote(Path("o3"));
  r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("rope_scaling"), std::string::npos) << Describe(args, r);
}

}  // namespace
}  // namespace eellm
