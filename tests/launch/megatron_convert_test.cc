// Megatron-LM / EE-LLM checkpoints -> eellm: an eellm model's tensors are written as a Megatron
// checkpoint by tests/checkpoints/torch_save.py (EE-LLM's layout: group-major fused QKV, SwiGLU
// halves per tensor-parallel rank, vocabulary shards, stage-local layer numbers, exit heads in
// argument order, torch.save's zip and pickle), read back by ReadMegatronCheckpoint and compared
// tensor by tensor; the CLI writes a loadable eellm checkpoint; bad inputs are refused by name.
#include "launch/megatron_convert.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "checkpoints/safetensors.h"
#include "checkpoints/torch_file.h"
#include "gtest/gtest.h"
#include "launch/exit_surgery.h"
#include "launch/model_loader.h"
#include "nlohmann/json.hpp"
#include "tests/launch/run_eellm.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;

bool HavePython() { return std::system("python3 -c 'import zipfile' >/dev/null 2>&1") == 0; }

struct Case {
  std::string name;
  std::string config;   // eellm model config (JSON)
  nlohmann::json args;  // Megatron arguments beyond the sizes
  int tp, pp;
  std::string dtype = "Float";
  bool old_names = false;
  bool mcore = false;  // Megatron-core names (Transformer Engine layers)
};

// The Megatron arguments of eellm config `c` plus `extra`.
nlohmann::json MegatronArgs(const ModelConfig& c, const Case& k) {
  nlohmann::json a = {
      {"num_layers", c.num_layers},
      {"hidden_size", c.hidden_size},
      {"ffn_hidden_size", c.ffn_hidden_size},
      {"num_attention_heads", c.num_heads},
      {"kv_channels", c.head_dim()},
      {"group_query_attention", c.num_kv_heads != c.num_heads},
      {"num_query_groups", c.num_kv_heads != c.num_heads ? c.num_kv_heads : 1},
      {"padded_vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_seq_len},
      {"norm_epsilon", c.norm_eps},
      {"tensor_model_parallel_size", k.tp},
      {"pipeline_model_parallel_size", k.pp},
      {"untie_embeddings_and_output_weights", !c.tie_embeddings},
      {"tokenizer_type", "GPT2BPETokenizer"},
      {"vocab_file", "gpt2-vocab.json"},
  };
  if (c.style == ModelStyle::kLlama) {
    a.update({{"normalization", "RMSNorm"},
              {"position_embedding_type", "rope"},
              {"swiglu", true},
              {"add_bias_linear", false}});
  } else {
    a.update({{"normalization", "LayerNorm"},
              {"position_embedding_type", "learned_absolute"},
              {"swiglu", false},
              {"add_bias_linear", true},
              {"bias_gelu_fusion", true}});
  }
  a.update(k.args);
  return a;
}

class MegatronConvertTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!HavePython()) GTEST_SKIP() << "python3 not found: the Megatron fixture cannot be written";
    be_ = testing::Cpu();
    dir_ = (fs::path(::testing::TempDir()) /
            absl::StrCat("eellm_megatron_", getpid(), "_", GetParam().name))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes the Megatron checkpoint of `c`'s model (random tensors) to dir_/megatron; returns the
  // tensors.
  HostTensorMap WriteCheckpoint(const ModelConfig& c, const Case& k) {
    auto model = Model::Create(c, be_.get());
    EXPECT_TRUE(model.ok()) << model.status();
    HostTensorMap t = ParamsToHost((*model)->params());
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& [name, x] : t) {  // multiples of 2^-10: exact after LayerNorm1P's shift by 1
      for (float& v : x.data) v = std::round(u(rng) * 1024.0f) / 1024.0f;
    }
    // EE-LLM's exit MLP branch shares its layer's post-attention norm.
    for (size_t i = 0; i < c.exits.size(); ++i) {
      if (c.exits[i].kind != ExitKind::kMlp) continue;
      for (const char* wb : {"weight", "bias"}) {
        auto src = t.find(absl::StrCat("layers.", c.exits[i].layer - 1, ".mlp_norm.", wb));
        if (src != t.end()) t[absl::StrCat("exits.", i, ".mlp_norm.", wb)] = src->second;
      }
    }
    const std::string st = dir_ + "/tensors.safetensors";
    EXPECT_TRUE(WriteSafetensorsFile(st, t, StDtype::kF32).ok());
    nlohmann::json spec = {{"args", MegatronArgs(c, k)},
                           {"iteration", 1200},
                           {"dtype", k.dtype},
                           {"old_names", k.old_names},
                           {"mcore", k.mcore}};
    std::ofstream(dir_ + "/spec.json") << spec.dump();
    const std::string cmd =
        absl::StrCat("python3 ", EELLM_SOURCE_DIR, "/tests/checkpoints/torch_save.py megatron ", st,
                     " ", dir_, "/spec.json ", dir_, "/megatron");
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    return t;
  }

  std::unique_ptr<Backend> be_;
  std::string dir_;
};

TEST_P(MegatronConvertTest, ReadsEveryTensorBackAsWritten) {
  const Case& k = GetParam();
  auto c = ParseModelConfig(k.config);
  ASSERT_TRUE(c.ok()) << c.status();
  const HostTensorMap want = WriteCheckpoint(*c, k);
  auto got = ReadMegatronCheckpoint(dir_ + "/megatron", false);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->config.ToJson(), c->ToJson());
  EXPECT_EQ(got->iteration, 1200);
  EXPECT_EQ(got->tp, k.tp);
  EXPECT_EQ(got->pp, k.pp);
  EXPECT_EQ(got->tokenizer, "GPT2BPETokenizer vocab_file=gpt2-vocab.json");
  ASSERT_EQ(got->tensors.size(), want.size());
  for (const auto& [name, w] : want) {
    auto g = got->tensors.find(name);
    ASSERT_NE(g, got->tensors.end()) << name;
    ASSERT_EQ(g->second.shape, w.shape) << name;
    for (size_t i = 0; i < w.data.size(); ++i) {
      if (k.dtype == "Float") {
        ASSERT_EQ(g->second.data[i], w.data[i]) << name << " element " << i;
      } else {  // bf16: 8 significant bits, rounded to nearest
        ASSERT_NEAR(g->second.data[i], w.data[i], std::abs(w.data[i]) * (1.0f / 256) + 1e-30f)
            << name << " element " << i;
      }
    }
  }
}

const char kLlama[] = R"({"style": "llama", "vocab_size": 96, "hidden_size": 32, "num_layers": 4,
  "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 48, "max_seq_len": 64)";
const char kGpt[] = R"({"style": "gpt", "vocab_size": 64, "hidden_size": 32, "num_layers": 4,
  "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 32)";

INSTANTIATE_TEST_SUITE_P(
    Layouts, MegatronConvertTest,
    ::testing::Values(
        // GQA, tp 2 x pp 2, norm exits in both stages given out of order (exit_output_layer
        // follows the arguments' order), untied heads and output.
        Case{"LlamaGqaTp2Pp2NormExits",
             std::string(kLlama) + R"(, "exits": [{"layer": 1, "temperature": 0.5},
                 {"layer": 3, "loss_weight": 0.25}]})",
             {{"exit_layer_nums", {3, 1}},
              {"exit_layer_temperature", {1.0, 0.5}},
              {"exit_layer_weight", {0.25, 1.0}},
              {"use_exit_norm", true},
              {"untie_exit_output_weights", true}},
             2,
             2},
        // GPT with biases, tied embeddings and an MLP exit sharing the word embeddings, tp 2,
        // Megatron's older names (input_layernorm, transformer), LayerNorm1P gains.
        Case{"GptTp2MlpExitTiedOldNames",
             std::string(kGpt) + R"(, "exits": [{"layer": 2, "kind": "mlp", "tied": true}]})",
             {{"exit_layer_nums", {2}},
              {"use_exit_norm", true},
              {"use_exit_mlp", true},
              {"apply_layernorm_1p", true}},
             2,
             1,
             "Float",
             true},
        // A block exit in stage 0 of pp 2, bf16 storages.
        Case{"LlamaPp2BlockExitBf16",
             std::string(kLlama) + R"(, "exits": [{"layer": 2, "kind": "block"}]})",
             {{"exit_layer_nums", {2}},
              {"use_exit_norm", true},
              {"use_exit_block", true},
              {"untie_exit_output_weights", true}},
             1,
             2,
             "BFloat16"},
        // Pre-layer linear exits (no exit norm), tp 2, pp 1 (mp_rank_TT directories).
        Case{"LlamaTp2PreLinearExits",
             std::string(kLlama) + R"(, "exits": [{"layer": 2, "kind": "linear",
                 "position": "pre"}, {"layer": 4, "kind": "linear", "position": "pre"}]})",
             {{"exit_layer_nums", {2, 4}}, {"pre_exit", true}, {"untie_exit_output_weights", true}},
             2,
             1},
        // use_exit_mlp with pre_exit: EE-LLM's pre exit skips the MLP branch, a norm exit.
        Case{"LlamaPreMlpExitReadsAsNorm",
             std::string(kLlama) + R"(, "exits": [{"layer": 2, "position": "pre"}]})",
             {{"exit_layer_nums", {2}},
              {"pre_exit", true},
              {"use_exit_mlp", true},
              {"use_exit_norm", true},
              {"untie_exit_output_weights", true}},
             1,
             1},
        // Megatron-core names: GQA over tp 2 x pp 2; GPT with tied embeddings over pp 2 (the
        // last stage's output_layer is a copy of them).
        Case{"CoreLlamaGqaTp2Pp2", std::string(kLlama) + "}", nlohmann::json::object(), 2, 2,
             "Float", false, true},
        Case{"CoreGptTiedPp2", std::string(kGpt) + "}", nlohmann::json::object(), 1, 2, "Float",
             false, true}),
    [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// The writer's layout against EE-LLM's as its code states it, element by element, so that the
// reader and writer cannot share a mistake: tensor rank 1 of stage 0 of a GQA model (4 heads of
// 8 in 2 KV groups, FFN 48, vocabulary 96, tp 2) holds KV group 1 as [q heads 2, 3; k 1; v 1],
// SwiGLU as [gate rows 24..47; up rows 24..47], attention output columns 16..31 and vocabulary
// rows 48..95.
class MegatronLayoutFacts : public MegatronConvertTest {};

TEST_P(MegatronLayoutFacts, RankOneHoldsTheShardsEeLlmGivesIt) {
  auto c = ParseModelConfig(GetParam().config);
  ASSERT_TRUE(c.ok()) << c.status();
  const HostTensorMap e = WriteCheckpoint(*c, GetParam());
  auto f = TorchFile::Open(dir_ + "/megatron/iter_0001200/mp_rank_01_000/model_optim_rng.pt");
  ASSERT_TRUE(f.ok()) << f.status();
  const PyValue& lm = *(*f)->root().Get("model")->Get("language_model");
  auto read = [&](const PyValue* v, const std::string& what) {
    EXPECT_NE(v, nullptr) << what;
    auto t = (*f)->ReadTensor(v ? *v : PyValue{}, what);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : HostTensor{};
  };
  // Row r of a [rows, cols] tensor.
  auto row = [](const HostTensor& t, int64_t r) {
    const int64_t w = t.shape[1];
    return std::vector<float>(t.data.begin() + r * w, t.data.begin() + (r + 1) * w);
  };
  const PyValue& enc = *lm.Get("encoder");
  const HostTensor qkv =
      read(enc.Get("layers.0.self_attention.query_key_value.weight"), "query_key_value");
  ASSERT_EQ(qkv.shape, (Shape{32, 32}));  // one group: 2 q heads + k + v, 8 rows each
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(row(qkv, i), row(e.at("layers.0.attn.wq.weight"), 16 + i)) << i;      // q head 2
    EXPECT_EQ(row(qkv, 8 + i), row(e.at("layers.0.attn.wq.weight"), 24 + i)) << i;  // q head 3
    EXPECT_EQ(row(qkv, 16 + i), row(e.at("layers.0.attn.wk.weight"), 8 + i)) << i;
    EXPECT_EQ(row(qkv, 24 + i), row(e.at("layers.0.attn.wv.weight"), 8 + i)) << i;
  }
  const HostTensor h4h = read(enc.Get("layers.0.mlp.dense_h_to_4h.weight"), "dense_h_to_4h");
  ASSERT_EQ(h4h.shape, (Shape{48, 32}));
  for (int i = 0; i < 24; ++i) {
    EXPECT_EQ(row(h4h, i), row(e.at("layers.0.mlp.fc1.weight"), 24 + i)) << i;  // gate (SiLU)
    EXPECT_EQ(row(h4h, 24 + i), row(e.at("layers.0.mlp.up.weight"), 24 + i)) << i;
  }
  const HostTensor dense = read(enc.Get("layers.0.self_attention.dense.weight"), "dense");
  ASSERT_EQ(dense.shape, (Shape{32, 16}));
  const HostTensor& wo = e.at("layers.0.attn.wo.weight");
  for (int r = 0; r < 32; ++r) EXPECT_EQ(dense.data[r * 16], wo.data[r * 32 + 16]) << r;
  const HostTensor word =
      read(lm.Get("embedding")->Get("word_embeddings")->Get("weight"), "word_embeddings");
  ASSERT_EQ(word.shape, (Shape{48, 32}));
  EXPECT_EQ(row(word, 0), row(e.at("embedding.word.weight"), 48));
}

INSTANTIATE_TEST_SUITE_P(Gqa, MegatronLayoutFacts,
                         ::testing::Values(Case{"LlamaGqaTp2Pp2", std::string(kLlama) + "}",
                                                nlohmann::json::object(), 2, 2}),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

class MegatronRefusals : public MegatronConvertTest {};

TEST_P(MegatronRefusals, CliConvertsAndBadInputsAreNamed) {
  Case k = GetParam();
  auto c = ParseModelConfig(k.config);
  ASSERT_TRUE(c.ok()) << c.status();
  const HostTensorMap want = WriteCheckpoint(*c, k);
  const std::string mg = dir_ + "/megatron";

  // The CLI asks for the tokenizer the Megatron run names, then writes an eellm checkpoint
  // (split for tp 2) holding the same tensors.
  const std::string args = absl::StrCat("convert megatron-to-eellm --input=", testing::Quote(mg),
                                        " --output=", testing::Quote(dir_ + "/out"), " --tp=2");
  testing::CmdResult r = testing::RunEellm(args);
  ASSERT_EQ(r.exit_code, 1) << testing::Describe(args, r);
  EXPECT_NE(r.output.find("used GPT2BPETokenizer vocab_file=gpt2-vocab.json, whose files are not "
                          "on this machine; pass them as --tokenizer"),
            std::string::npos)
      << r.output;
  r = testing::RunEellm(args + " --tokenizer=byte");
  ASSERT_EQ(r.exit_code, 0) << testing::Describe(args, r);
  auto loaded = LoadModelFromCheckpoint(dir_ + "/out", be_.get());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(ParamsToHost(loaded->model->params()).size(), want.size());
  for (const auto& [name, t] : ParamsToHost(loaded->model->params())) {
    EXPECT_EQ(t.data, want.at(name).data) << name;
  }

  // A run whose tokenizer is on this machine (tokenizer_model: a directory holding a
  // tokenizer.json) converts with it without --tokenizer, and keeps it beside the checkpoint.
  {
    fs::create_directories(dir_ + "/hf");
    nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\xE2\x96\x81", 3},
                            {"a", 4},     {"b", 5},   {"ab", 6}};
    const nlohmann::json tj = {
        {"added_tokens",
         {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
          {{"id", 1}, {"content", "<s>"}, {"special", true}},
          {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
        {"normalizer",
         {{"type", "Sequence"},
          {"normalizers",
           {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
            {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}}},
        {"model",
         {{"type", "BPE"}, {"unk_token", "<unk>"}, {"vocab", vocab}, {"merges", {"a b"}}}}};
    std::ofstream(dir_ + "/hf/tokenizer.json") << tj.dump();
    Case own = k;
    own.args.update({{"tokenizer_type", "Llama2Tokenizer"}, {"tokenizer_model", dir_ + "/hf"}});
    WriteCheckpoint(*c, own);
    const std::string out2 = dir_ + "/out_own";
    const std::string convert =
        absl::StrCat("convert megatron-to-eellm --input=", testing::Quote(mg),
                     " --output=", testing::Quote(out2));
    testing::CmdResult o = testing::RunEellm(convert);
    ASSERT_EQ(o.exit_code, 0) << testing::Describe(convert, o);
    EXPECT_NE(o.output.find("tokenizer: the run's " + dir_ + "/hf/tokenizer.json"),
              std::string::npos)
        << o.output;
    EXPECT_TRUE(fs::exists(out2 + "/tokenizer.json"));
    WriteCheckpoint(*c, k);  // back to the run without its files
  }

  // A tracker naming an iteration that is not there; a stage file missing.
  std::ofstream(mg + "/latest_checkpointed_iteration.txt") << "1300";
  auto s = ReadMegatronCheckpoint(mg, false).status();
  EXPECT_NE(s.message().find("names iteration 1300 but"), std::string::npos) << s;
  fs::remove(mg + "/iter_0001200/mp_rank_01_001/model_optim_rng.pt");
  s = ReadMegatronCheckpoint(mg + "/iter_0001200", false).status();
  EXPECT_NE(s.message().find("mp_rank_01_001/model_optim_rng.pt"), std::string::npos) << s;
  // One file of a tp 2 x pp 2 run.
  s = ReadMegatronCheckpoint(mg + "/iter_0001200/mp_rank_00_000/model_optim_rng.pt", false)
          .status();
  EXPECT_NE(s.message().find("is one file of a tp 2 x pp 2 checkpoint"), std::string::npos) << s;
  // Megatron-core's distributed format.
  std::ofstream(mg + "/latest_checkpointed_iteration.txt") << "1200";
  std::ofstream(mg + "/iter_0001200/.metadata") << "x";
  s = ReadMegatronCheckpoint(mg, false).status();
  EXPECT_NE(s.message().find("distributed format (torch_dist"), std::string::npos) << s;
}

INSTANTIATE_TEST_SUITE_P(Cli, MegatronRefusals,
                         ::testing::Values(Case{"LlamaTp2Pp2", std::string(kLlama) + "}",
                                                nlohmann::json::object(), 2, 2}),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// Args alone: combinations eellm cannot express are refused naming the arguments.
TEST(MegatronArgs, UnsupportedArchitecturesAreNamed) {
  auto run = [](const std::string& overrides) {
    const std::string py = absl::StrCat(
        "python3 -c \"import sys; sys.path.insert(0, '", EELLM_SOURCE_DIR,
        "/tests/checkpoints'); import torch_save as t, argparse; "
        "a = dict(num_layers=2, hidden_size=32, num_attention_heads=4, padded_vocab_size=64, "
        "max_position_embeddings=32, normalization='RMSNorm', position_embedding_type='rope', "
        "swiglu=True, add_bias_linear=False); a.update(",
        overrides, "); t.save({'args': argparse.Namespace(**a)}, sys.argv[1])\" ");
    const std::string file = absl::StrCat(::testing::TempDir(), "/megatron_args_", getpid(), ".pt");
    EXPECT_EQ(std::system((py + file).c_str()), 0);
    auto f = TorchFile::Open(file);
    std::vector<std::string> warnings;
    if (!f.ok()) return std::make_pair(f.status(), warnings);
    auto c = ModelConfigFromMegatronArgs(*(*f)->root().Get("args"), &warnings);
    fs::remove(file);
    return std::make_pair(c.status(), warnings);
  };
  if (!HavePython()) GTEST_SKIP() << "python3 not found";
  EXPECT_TRUE(run("").first.ok()) << run("").first;
  auto s = run("normalization='LayerNorm'").first;
  EXPECT_NE(s.message().find("normalization LayerNorm, position_embedding_type rope"),
            std::string::npos)
      << s;
  s = run("rotary_percent=0.5").first;
  EXPECT_NE(s.message().find("rotary_percent = float 0.5"), std::string::npos) << s;
  s = run("exit_layer_nums=[1], use_exit_mlp=True").first;
  EXPECT_NE(s.message().find("use_exit_norm False"), std::string::npos) << s;
  s = run("num_layers='two'").first;
  EXPECT_NE(s.message().find("num_layers = str 'two': expected an integer"), std::string::npos)
      << s;
  // The exact GELU converts with a warning; the fused bias-GELU (tanh) without.
  auto gpt =
      "normalization='LayerNorm', position_embedding_type='learned_absolute', "
      "swiglu=False, add_bias_linear=True, bias_gelu_fusion=";
  auto [ok, warn] = run(absl::StrCat(gpt, "False"));
  EXPECT_TRUE(ok.ok()) << ok;
  ASSERT_EQ(warn.size(), 1u);
  EXPECT_NE(warn[0].find("exact (erf) GELU"), std::string::npos);
  EXPECT_TRUE(run(absl::StrCat(gpt, "True")).second.empty());
  // Megatron's default dropouts (EE-LLM's scripts keep them) are said, to be passed on.
  auto [dropped, notes] = run("hidden_dropout=0.1, attention_dropout=0.1");
  EXPECT_TRUE(dropped.ok()) << dropped;
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("hidden_dropout 0.1; pass --hidden-dropout=0.1"), std::string::npos)
      << notes[0];
  EXPECT_NE(notes[0].find("attention_dropout 0.1 eellm does not implement"), std::string::npos)
      << notes[0];
  EXPECT_TRUE(run("hidden_dropout=0.0, attention_dropout=0.0").second.empty());
}

}  // namespace
}  // namespace eellm
