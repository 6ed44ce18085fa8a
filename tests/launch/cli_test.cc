// End-to-end tests of the `eellm` binary: every user error (bad run config, missing data,
// corrupt or mismatched checkpoint, bad flags) exits non-zero with a message that names the bad
// key, value, file or tensor; and data -> train -> generate works on a tiny model.
//
// Each test runs the binary (EELLM_BINARY_DIR "/eellm") through the shell with stdout and
// stderr merged, in its own temporary directory. The models are tiny (~40k parameters, a few
// steps), so the whole file runs in a few seconds.
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "hdf5.h"
#include "httplib.h"
#include "models/token_file.h"
#include "nlohmann/json.hpp"
#include "tests/launch/cli_fixture.h"
#include "tests/models/megatron_fixture.h"

namespace eellm {
namespace {

using cli::CliTest;
using cli::kTinyModel;
using cli::ParallelCliTest;
using cli::TokensGenerated;
using cli::WriteFile;
using testing::CmdResult;
using testing::Describe;
using testing::Quote;
using testing::RunEellm;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Run config errors.

TEST_F(CliTest, UnknownModelKeyIsNamed) {
  ExpectTrainConfigError(R"({"style": "gpt", "vocab_size": 258, "hiden_size": 32,
      "num_layers": 2, "num_heads": 2, "max_seq_len": 32})",
                         {"hiden_size"});
}

TEST_F(CliTest, UnknownTrainKeyIsNamed) {
  ExpectTrainConfigError(kTinyModel, {"eval_batchs"}, ", \"eval_batchs\": 3");
}

TEST_F(CliTest, BadCommunicatorIsNamed) {
  ExpectTrainConfigError(kTinyModel, {"communicator \"gloo\"", "auto, nccl or mpi"},
                         ", \"communicator\": \"gloo\"");
}

TEST_F(CliTest, BadLrDecayStyleIsNamed) {
  ExpectTrainConfigError(kTinyModel, {"lr_decay_style \"exponential\"", "inverse-square-root"},
                         ", \"lr_decay_style\": \"exponential\"");
  ExpectTrainConfigError(kTinyModel, {"lr_decay_steps 2 must be above warmup_steps 2"},
                         ", \"lr_decay_steps\": 2");
}

// Megatron's schedule and optimizer settings reach the run: a constant LR after the warm-up
// (lr 1e-3 in every step's line from the second on).
TEST_F(CliTest, LrDecayStyleAndAdamEpsReachTheRun) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string args =
      "train --config=" +
      Quote(WriteConfig(kTinyModel, 5,
                        ", \"lr_decay_style\": \"constant\", \"adam_eps\": 1e-5, "
                        "\"init_method_std\": 0.01"));
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int step = 2; step <= 5; ++step) {
    EXPECT_NE(r.output.find(absl::StrFormat("step %5d/5 |", step)), std::string::npos) << r.output;
  }
  size_t lines = 0;
  for (size_t at = 0; (at = r.output.find("| lr 1.00e-03 |", at)) != std::string::npos; ++at) {
    ++lines;
  }
  EXPECT_EQ(lines, 4u) << r.output;  // steps 2-5; step 1 is the warm-up's 5e-4
}

TEST_F(CliTest, BadBackendIsNamed) {
  ExpectTrainConfigError(kTinyModel, {"\"cuda-fp8\""}, ", \"backend\": \"cuda-fp8\"");
}

// --backend overrides the config's train.backend (a bad name is named, so the flag reached the
// run), and another command's flag is named instead of ignored.
TEST_F(CliTest, TrainTakesBackendAndRefusesOtherCommandsFlags) {
  const std::string config = Quote(WriteConfig(kTinyModel, 1));
  std::string args = "train --config=" + config + " --backend=cuda-fp8";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("\"cuda-fp8\""), std::string::npos) << Describe(args, r);
  args = "train --config=" + config + " --batch=3";
  r = RunEellm(args);
  EXPECT_EQ(r.exit_code, 2) << Describe(args, r);
  EXPECT_NE(r.output.find("--batch is not a flag of `eellm train`"), std::string::npos)
      << Describe(args, r);
  args = "data --seed=3";
  r = RunEellm(args);
  EXPECT_EQ(r.exit_code, 2) << Describe(args, r);
  EXPECT_NE(r.output.find("--seed is not a flag of `eellm data`"), std::string::npos)
      << Describe(args, r);
}

TEST_F(CliTest, UnknownTopLevelKeyIsNamed) {
  const std::string path = Path("config.json");
  WriteFile(path, std::string("{\"model\": ") + kTinyModel + ", \"trian\": {}}");
  const std::string args = "train --config=" + Quote(path);
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("trian"), std::string::npos) << Describe(args, r);
}

TEST_F(CliTest, ExitLayerOutOfRangeIsNamed) {
  ExpectTrainConfigError(R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 4, "num_heads": 2, "max_seq_len": 32,
      "exits": [{"layer": 9, "kind": "norm"}]})",
                         {"layer 9", "num_layers 4"});
}

TEST_F(CliTest, NumHeadsNotDividingHiddenSizeIsNamed) {
  ExpectTrainConfigError(R"({"style": "gpt", "vocab_size": 258, "hidden_size": 100,
      "num_layers": 2, "num_heads": 3, "max_seq_len": 32})",
                         {"num_heads 3", "100"});
}

TEST_F(CliTest, NumKvHeadsNotDividingNumHeadsIsNamed) {
  ExpectTrainConfigError(R"({"style": "llama", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 2, "num_heads": 4, "num_kv_heads": 3, "max_seq_len": 32})",
                         {"num_kv_heads 3", "num_heads 4"});
}

TEST_F(CliTest, QkvBiasOnGptIsNamed) {
  ExpectTrainConfigError(R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "qkv_bias": true})",
                         {"qkv_bias", "style llama"});
}

TEST_F(CliTest, BadExitKindIsNamed) {
  ExpectTrainConfigError(R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 2, "num_heads": 2, "max_seq_len": 32,
      "exits": [{"layer": 1, "kind": "convolution"}]})",
                         {"\"convolution\""});
}

TEST_F(CliTest, MissingConfigFileIsNamed) {
  const std::string path = Path("no_such_config.json");
  const std::string args = "train --config=" + Quote(path);
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(path), std::string::npos) << Describe(args, r);
}

// ---------------------------------------------------------------------------------------------
// Data errors.

TEST_F(CliTest, MissingDataFileIsNamed) {
  // A valid config whose data prefix has no token files.
  const std::string args = "train --config=" + Quote(WriteConfig(kTinyModel));
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(Path("data/tiny") + ".train.bin"), std::string::npos)
      << Describe(args, r);
}

TEST_F(CliTest, MissingTextFileIsNamed) {
  const std::string input = Path("no_such_text.txt");
  const std::string args = "data --input=" + Quote(input) + " --output=" + Quote(Path("data/tiny"));
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(input), std::string::npos) << Describe(args, r);
}

TEST_F(CliTest, ValidationSetTooSmallForOneBatchIsNamed) {
  // 1% of ~8.5 KB is ~85 tokens, less than one 4 x 32 evaluation batch: training must refuse
  // (it used to report a validation loss of 0.0000).
  ASSERT_TRUE(PrepareTinyData(0.01));
  const std::string args = "train --config=" + Quote(WriteConfig(kTinyModel));
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(Path("data/tiny") + ".val.bin"), std::string::npos) << Describe(args, r);
  EXPECT_EQ(r.output.find("val final 0.0000"), std::string::npos) << Describe(args, r);
}

// ---------------------------------------------------------------------------------------------
// Resuming.

// EE-Tuning's path through the CLI: add an exit to a trained checkpoint, then train from its
// weights (fresh optimizer, step 0) with the extended model config; a run whose model config
// differs from the checkpoint's is refused, naming both.
TEST_F(CliTest, AddExitsThenTrainFromTheWeights) {
  ASSERT_FALSE(TrainTinyModel(2).empty());
  const std::string model = AddPreExitAtLayer1("tuned");
  ASSERT_FALSE(model.empty());
  const std::string args = "train --config=" + Quote(WriteConfig(model, 3)) +
                           " --init-from=" + Quote(Path("tuned")) + " --out=" + Quote(Path("run2"));
  CmdResult t = RunEellm(args);
  EXPECT_EQ(t.exit_code, 0) << Describe(args, t);
  EXPECT_NE(t.output.find("step     1/3"), std::string::npos) << Describe(args, t);
  EXPECT_NE(t.output.find("step     3/3"), std::string::npos) << Describe(args, t);
  EXPECT_NE(t.output.find("2 exits"), std::string::npos) << Describe(args, t);
  // The original model config does not match the extended checkpoint.
  const std::string bad = "train --config=" + Quote(WriteConfig(kTinyModel, 3)) +
                          " --init-from=" + Quote(Path("tuned")) + " --out=" + Quote(Path("run3"));
  CmdResult b = RunEellm(bad);
  EXPECT_NE(b.exit_code, 0) << Describe(bad, b);
  EXPECT_NE(b.output.find("holds a model with config"), std::string::npos) << Describe(bad, b);
}

// EE-Tuning step 2: the extended model trains with a frozen backbone. The final head's
// validation loss is the same before and after (the backbone does not move) while the exits
// train; a model whose exits own no tensor is refused, naming the reason.
TEST_F(CliTest, FreezeBackboneTrainsTheExitsAlone) {
  ASSERT_FALSE(TrainTinyModel(2).empty());
  const std::string model = AddPreExitAtLayer1("tuned");
  ASSERT_FALSE(model.empty());
  const std::string args = "train --config=" + Quote(WriteConfig(model, 4)) +
                           " --init-from=" + Quote(Path("tuned")) +
                           " --out=" + Quote(Path("run2")) + " --freeze-backbone";
  CmdResult t = RunEellm(args);
  ASSERT_EQ(t.exit_code, 0) << Describe(args, t);
  EXPECT_NE(t.output.find("frozen backbone (EE-Tuning)"), std::string::npos) << Describe(args, t);
  auto val_line = [&](int step) {
    const std::string key = absl::StrFormat("eval step %d | val ", step);
    const size_t from = t.output.find(key);
    return from == std::string::npos
               ? std::string()
               : t.output.substr(from + key.size(), t.output.find('\n', from) - from - key.size());
  };
  const std::string before = val_line(0), after = val_line(4);
  ASSERT_FALSE(before.empty() || after.empty()) << Describe(args, t);
  // "final X exit@1 Y exit@2 Z": the final head's loss is unchanged, the exits' are not.
  const std::string final_before = before.substr(0, before.find(" exit@"));
  EXPECT_EQ(final_before, after.substr(0, after.find(" exit@"))) << before << " vs " << after;
  EXPECT_NE(before, after) << "the exits did not train";
  // Without layer 2, past the deepest exit: the checkpoint is still whole (generation loads it),
  // and without a checkpoint to copy that layer from the run is refused.
  const std::string cut = "train --config=" + Quote(WriteConfig(model, 4)) +
                          " --init-from=" + Quote(Path("tuned")) + " --out=" + Quote(Path("run3")) +
                          " --freeze-backbone --skip-layers-past-exits";
  CmdResult c = RunEellm(cut);
  ASSERT_EQ(c.exit_code, 0) << Describe(cut, c);
  EXPECT_NE(c.output.find("layers 2-2 and the final head are neither built nor loaded"),
            std::string::npos)
      << Describe(cut, c);
  EXPECT_NE(c.output.find("eval step 4 | val final - exit@"), std::string::npos)
      << Describe(cut, c);
  const std::string gen = "generate --checkpoint=" + Quote(Path("run3")) + " --max_new_tokens=2";
  CmdResult g = RunEellm(gen);
  EXPECT_EQ(g.exit_code, 0) << Describe(gen, g);
  const std::string alone = "train --config=" + Quote(WriteConfig(model, 4)) +
                            " --out=" + Quote(Path("run4")) +
                            " --freeze-backbone --skip-layers-past-exits";
  CmdResult a = RunEellm(alone);
  EXPECT_NE(a.exit_code, 0) << Describe(alone, a);
  EXPECT_NE(a.output.find("needs a checkpoint to start from"), std::string::npos)
      << Describe(alone, a);
  // A linear exit tied to the embedding has no tensor of its own.
  ExpectTrainConfigError(
      R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32, "num_layers": 2,
          "num_heads": 2, "max_seq_len": 32,
          "exits": [{"layer": 1, "kind": "linear", "tied": true}]})",
      {"freeze_backbone", "no exit parameters"}, R"(, "freeze_backbone": true)");
}

// The training and validation lines of a run's output, without their speeds.
std::vector<std::string> LossLines(const std::string& output) {
  std::vector<std::string> lines;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("step ", 0) == 0) {
      const size_t tps = line.find(" tok/s");
      lines.push_back(line.substr(0, line.rfind(" | ", tps)));
    } else if (line.rfind("eval step ", 0) == 0) {
      lines.push_back(line);
    }
  }
  return lines;
}

// A Megatron dataset (<prefix>.bin and .idx, as Megatron's preprocess_data.py writes them) of
// the tokens of `eellm data`'s files, the validation tokens as its last document: training on it,
// split by val_fraction at that document, logs the losses that training on the token files does.
TEST_F(CliTest, TrainsOnAMegatronDatasetAsOnTokenFiles) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  auto train = ReadTokenFile(Path("data/tiny.train.bin"));
  auto val = ReadTokenFile(Path("data/tiny.val.bin"));
  ASSERT_TRUE(train.ok() && val.ok());
  const size_t third = train->size() / 3;
  std::vector<std::vector<int32_t>> docs = {{train->begin(), train->begin() + third},
                                            {train->begin() + third, train->begin() + 2 * third},
                                            {train->begin() + 2 * third, train->end()},
                                            *val};
  fs::create_directories(Path("mega"));
  testing::WriteMegatronDataset(Path("mega/corpus_text_document"), docs);
  const double fraction = static_cast<double>(val->size()) / (train->size() + val->size());
  const std::string base =
      "train --config=" +
      Quote(WriteConfig(
          kTinyModel, 6,
          absl::StrFormat(", \"val_fraction\": %.17g, \"eval_interval\": 3", fraction)));
  CmdResult a = RunEellm(base + " --out=" + Quote(Path("run_a")));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  CmdResult b = RunEellm(base + " --out=" + Quote(Path("run_b")) +
                         " --data=" + Quote(Path("mega/corpus_text_document")));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("data: Megatron dataset "), std::string::npos) << b.output;
  EXPECT_NE(b.output.find(absl::StrFormat("4 documents, %d tokens; the last %d tokens",
                                          train->size() + val->size(), val->size())),
            std::string::npos)
      << b.output;
  const std::vector<std::string> want = LossLines(a.output);
  EXPECT_EQ(want.size(), 9u) << a.output;  // 6 steps; evaluations at steps 0, 3 and 6
  EXPECT_EQ(LossLines(b.output), want) << b.output;
  // A blend of one part (Megatron's "--data-path 1 prefix") is that part.
  const std::string mega = Path("mega/corpus_text_document");
  CmdResult c = RunEellm(base + " --out=" + Quote(Path("run_c")) + " --data=" + Quote("1 " + mega));
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_EQ(LossLines(c.output), want) << c.output;
  // A blend of the token files and the Megatron copy trains on both.
  CmdResult d = RunEellm(base + " --out=" + Quote(Path("run_d")) +
                         " --data=" + Quote("0.25 " + Path("data/tiny") + " 0.75 " + mega));
  ASSERT_EQ(d.exit_code, 0) << d.output;
  EXPECT_NE(d.output.find("data: a blend of 2: 0.250 x " + Path("data/tiny")), std::string::npos)
      << d.output;
  EXPECT_EQ(LossLines(d.output).size(), 9u) << d.output;
}

TEST_F(CliTest, ResumeContinuesFromTheCheckpointStep) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  const std::string args =
      "train --config=" + Quote(Path("config.json")) + " --steps=4 --resume=" + Quote(ckpt);
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("trained 2 steps"), std::string::npos) << Describe(args, r);
  EXPECT_NE(r.output.find("(step 4)"), std::string::npos) << Describe(args, r);
}

// exit_duration_mins (Megatron's --exit-duration-in-mins): the run stops after the first step
// that ends past the limit, saves that step, says how to go on, and --resume goes on from it.
TEST_F(CliTest, ExitDurationStopsWithACheckpointToResume) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string config =
      WriteConfig(kTinyModel, 100000, ", \"exit_duration_mins\": 0.0002, \"log_interval\": 1000");
  CmdResult r = RunEellm("train --config=" + Quote(config));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m,
                                std::regex("stopped at step (\\d+) of 100000 after "
                                           "exit_duration_mins 0.0002; continue "
                                           "with --resume=")))
      << r.output;
  const int stopped = std::stoi(m[1]);
  EXPECT_LT(stopped, 100000);
  ASSERT_TRUE(fs::exists(Path(absl::StrFormat("run/step_%08d", stopped)))) << r.output;
  // (without the time limit, which the resumed run's first steps could pass again)
  const std::string resume = "train --config=" + Quote(WriteConfig(kTinyModel, 100000)) +
                             " --resume=" + Quote(Path("run")) +
                             " --steps=" + std::to_string(stopped + 2);
  CmdResult c = RunEellm(resume);
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("trained 2 steps"), std::string::npos) << c.output;
}

// exit_signal_handler (Megatron's --exit-signal-handler): a SIGTERM (Slurm's warning before its
// time limit) ends the run after the step in progress, with a checkpoint and exit status 0.
TEST_F(CliTest, SigtermStopsWithACheckpoint) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string config =
      WriteConfig(kTinyModel, 1000000, ", \"exit_signal_handler\": true, \"log_interval\": 100000");
  const std::string cmd = "(" + Quote(testing::kEellm) + " train --config=" + Quote(config) +
                          " > " + Quote(Path("term.out")) +
                          " 2>&1 & pid=$!; sleep 2; kill -TERM $pid; wait $pid; echo $? > " +
                          Quote(Path("term.rc")) + ")";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream rc_file(Path("term.rc")), out_file(Path("term.out"));
  int rc = -1;
  rc_file >> rc;
  const std::string out((std::istreambuf_iterator<char>(out_file)),
                        std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m,
                                std::regex("stopped at step (\\d+) of 1000000 after a "
                                           "SIGTERM")))
      << out;
  EXPECT_TRUE(fs::exists(Path(absl::StrFormat("run/step_%08d", std::stoi(m[1]))))) << out;
}

TEST_F(CliTest, ResumeAtOrPastTheLastStepFails) {
  // Resuming a step-3 checkpoint with steps 2 used to "train -1 steps" and overwrite it as
  // step 2.
  const std::string ckpt = TrainTinyModel(3);
  ASSERT_FALSE(ckpt.empty());
  for (const char* steps : {"3", "2"}) {
    const std::string args = "train --config=" + Quote(Path("config.json")) + " --steps=" + steps +
                             " --resume=" + Quote(ckpt);
    CmdResult r = RunEellm(args);
    EXPECT_NE(r.exit_code, 0) << Describe(args, r);
    EXPECT_NE(r.output.find("step 3"), std::string::npos) << Describe(args, r);
    EXPECT_NE(r.output.find(ckpt), std::string::npos) << Describe(args, r);
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint errors.

TEST_F(CliTest, TruncatedCheckpointIsNamed) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  const std::string truncated = Path("truncated.h5");
  {
    std::ifstream in(ckpt, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GT(bytes.size(), 1000u);
    WriteFile(truncated, bytes.substr(0, bytes.size() / 2));
  }
  const std::string args = "generate --checkpoint=" + Quote(truncated) + " --max_new_tokens=4";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(truncated), std::string::npos) << Describe(args, r);
}

TEST_F(CliTest, MissingCheckpointIsNamed) {
  const std::string ckpt = Path("no_such_checkpoint.h5");
  const std::string args = "generate --checkpoint=" + Quote(ckpt);
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find(ckpt), std::string::npos) << Describe(args, r);
}

// Returns the shape of dataset `name` in `file`, or {} if it cannot be read.
std::vector<hsize_t> DatasetShape(hid_t file, const char* name) {
  std::vector<hsize_t> dims;
  hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
  if (ds < 0) return dims;
  hid_t space = H5Dget_space(ds);
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank > 0) {
    dims.resize(rank);
    H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  }
  H5Sclose(space);
  H5Dclose(ds);
  return dims;
}

TEST_F(CliTest, WrongTensorShapeNamesTensorAndShapes) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  const char kTensor[] = "/model/layers.0.attn.wq.weight";
  const std::string bad = Path("wrong_shape.h5");
  fs::copy_file(ckpt, bad);
  {
    hid_t file = H5Fopen(bad.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0) << "cannot open " << bad << " with HDF5";
    // The premise: the tiny model's wq is [hidden, hidden] = [32, 32].
    EXPECT_EQ(DatasetShape(file, kTensor), (std::vector<hsize_t>{32, 32}));
    ASSERT_GE(H5Ldelete(file, kTensor, H5P_DEFAULT), 0);
    const hsize_t dims[2] = {16, 32};
    std::vector<float> zeros(16 * 32, 0.0f);
    hid_t space = H5Screate_simple(2, dims, nullptr);
    hid_t ds =
        H5Dcreate2(file, kTensor, H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(ds, 0);
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros.data()), 0);
    H5Dclose(ds);
    H5Sclose(space);
    ASSERT_GE(H5Fclose(file), 0);
  }
  // The unmodified checkpoint loads (so the failure below is the shape's doing).
  const std::string ok_args = "generate --checkpoint=" + Quote(ckpt) + " --max_new_tokens=2";
  CmdResult ok = RunEellm(ok_args);
  EXPECT_EQ(ok.exit_code, 0) << Describe(ok_args, ok);

  const std::string args = "generate --checkpoint=" + Quote(bad) + " --max_new_tokens=2";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  for (const std::string& n : {bad, std::string("layers.0.attn.wq.weight"), std::string("[16, 32]"),
                               std::string("[32, 32]")}) {
    EXPECT_NE(r.output.find(n), std::string::npos) << "expected \"" << n << "\" in the output\n"
                                                   << Describe(args, r);
  }
}

// ---------------------------------------------------------------------------------------------
// Command line.

TEST_F(CliTest, UnknownSubcommandFails) {
  CmdResult r = RunEellm("frobnicate");
  EXPECT_NE(r.exit_code, 0) << Describe("frobnicate", r);
  EXPECT_NE(r.output.find("frobnicate"), std::string::npos) << Describe("frobnicate", r);
}

TEST_F(CliTest, NoSubcommandFailsWithUsage) {
  CmdResult r = RunEellm("");
  EXPECT_NE(r.exit_code, 0) << Describe("", r);
  EXPECT_NE(r.output.find("usage"), std::string::npos) << Describe("", r);
}

TEST_F(CliTest, UnknownFlagFails) {
  const std::string args = "train --bogus-flag=1";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("bogus"), std::string::npos) << Describe(args, r);
}

TEST_F(CliTest, StrayPositionalArgumentFails) {
  const std::string args = "train stray";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("stray"), std::string::npos) << Describe(args, r);
}

TEST_F(CliTest, TrainHelpListsConfigFlag) {
  CmdResult r = RunEellm("train --help");
  EXPECT_EQ(r.exit_code, 0) << Describe("train --help", r);
  EXPECT_NE(r.output.find("--config"), std::string::npos) << Describe("train --help", r);
  // Only the train command's flags.
  EXPECT_EQ(r.output.find("--max_new_tokens"), std::string::npos) << Describe("train --help", r);
}

TEST_F(CliTest, GenerateRejectsBadThreshold) {
  const std::string args = "generate --checkpoint=" + Quote(Path("x.h5")) + " --threshold=1.5";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("1.5"), std::string::npos) << Describe(args, r);
}

// ---------------------------------------------------------------------------------------------
// Happy path.

TEST_F(CliTest, DataTrainGenerate) {
  const std::string ckpt = TrainTinyModel(5);
  ASSERT_FALSE(ckpt.empty());
  const std::string args =
      "generate --checkpoint=" + Quote(ckpt) + " --compare --max_new_tokens 20 --threshold 0.5";
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("tokens/s"), std::string::npos) << Describe(args, r);
  EXPECT_NE(r.output.find("exit histogram"), std::string::npos) << Describe(args, r);
  EXPECT_NE(r.output.find("[full]"), std::string::npos) << Describe(args, r);
  EXPECT_NE(r.output.find("[early-exit]"), std::string::npos) << Describe(args, r);
  const int n = TokensGenerated(r.output, "early-exit");
  EXPECT_GE(n, 1) << Describe(args, r);
  EXPECT_LE(n, 20) << Describe(args, r);
}

// `eellm bench train --torch-reference` runs the reference (here a shell script standing in for
// tools/bench_torch.py) with and without exits on the same batch, shows its output and prints
// both ratios from its result lines; a failing reference fails the command, naming it.
TEST_F(CliTest, BenchRunsTheTorchReferenceWithAndWithoutExits) {
  const std::string script = Path("reference.sh");
  WriteFile(script,
            "echo \"reference called with: $*\"\n"
            "case \" $* \" in *\" --no-exits \"*) r=2000 ;; *) r=1000 ;; esac\n"
            "[ -n \"$FAIL\" ] && { echo 'reference broke'; exit 1; }\n"
            "echo \"{\\\"tokens_per_s\\\": $r}\"\n");
  const std::string args = "bench train --model=" + Quote(WriteConfig(kTinyModel)) +
                           " --backend=cpu --batch=2 --seq=16 --steps=1 --warmup=0 --python=sh"
                           " --torch-reference=" +
                           Quote(script);
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("reference called with: --model"), std::string::npos)
      << Describe(args, r);
  // The GEMMs of the profiled step by shape, with their rate.
  std::smatch g;
  EXPECT_TRUE(std::regex_search(
      r.output, g,
      std::regex(R"(\n  LinearBackward 32 x \d+ <- \d+, f32 dX.* TFLOP/s \( *\d+%\))")))
      << Describe(args, r);
  EXPECT_NE(r.output.find("--batch 2 --micro-batch 2 --seq 16 --steps 1 --warmup 0 --device cpu"),
            std::string::npos)
      << Describe(args, r);
  std::smatch m;
  ASSERT_TRUE(
      std::regex_search(r.output, m, std::regex(R"(\neellm / PyTorch tokens/s: (\d+) / 1000 = )")))
      << Describe(args, r);
  ASSERT_TRUE(std::regex_search(
      r.output, m, std::regex(R"(without exits: eellm / PyTorch tokens/s: (\d+) / 2000 = )")))
      << Describe(args, r);
  CmdResult failed = RunEellm(args, "FAIL=1 ");
  EXPECT_NE(failed.exit_code, 0) << Describe(args, failed);
  EXPECT_NE(failed.output.find("reference broke"), std::string::npos) << Describe(args, failed);
  EXPECT_NE(failed.output.find("the PyTorch reference failed"), std::string::npos)
      << Describe(args, failed);
}

// `eellm bench attention`: the attention ops alone at the model's shape, forward and backward,
// each printed as milliseconds and TFLOP/s whose product is the profiler's FLOP count (forward
// 4 d b hq t (t + 1) / 2, backward 2.5 times that), and a decoding step as milliseconds and GB/s
// whose product is the cache it reads; bad sizes are refused, naming them.
TEST_F(CliTest, BenchAttentionTimesForwardAndBackward) {
  const std::string args = "bench attention --model=" + Quote(WriteConfig(kTinyModel)) +
                           " --backend=cpu --batch=3 --seq=20 --steps=2 --warmup=0";
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      r.output, m,
      std::regex(R"(batch 3, heads (\d+)/(\d+), 20 tokens, head dimension (\d+), backend cpu)")))
      << Describe(args, r);
  const double hq = std::stod(m[1]), hkv = std::stod(m[2]), d = std::stod(m[3]);
  const double forward_flops = 4.0 * d * 3 * hq * 20 * 21 / 2;
  for (const auto& [name, flops] : {std::pair<std::string, double>{"forward", forward_flops},
                                    {"backward", 2.5 * forward_flops}}) {
    ASSERT_TRUE(std::regex_search(
        r.output, m, std::regex("\n  " + name + R"( +([0-9.e+-]+) ms +([0-9.e+-]+) TFLOP/s)")))
        << name << "\n"
        << Describe(args, r);
    const double ms = std::stod(m[1]), tflops = std::stod(m[2]);
    EXPECT_GT(ms, 0) << name;
    EXPECT_NEAR(ms * 1e-3 * tflops * 1e12, flops, 2e-3 * flops) << name;
  }
  // The decoding step: 3 sequences of 20 cached tokens and one new, K and V of 21 rows each read
  // once (fp32 on the CPU).
  ASSERT_TRUE(std::regex_search(
      r.output, m,
      std::regex(R"(\n  decode +([0-9.e+-]+) ms +([0-9.e+-]+) GB/s of the cache read .*: 3 )"
                 R"(sequences of 20 cached tokens)")))
      << Describe(args, r);
  const double decode_bytes = 2.0 * 3 * 21 * hkv * d * sizeof(float);
  EXPECT_NEAR(std::stod(m[1]) * 1e-3 * std::stod(m[2]) * 1e9, decode_bytes, 2e-3 * decode_bytes);
  const std::string bad = "bench attention --model=" + Quote(WriteConfig(kTinyModel)) +
                          " --backend=cpu --batch=0 --seq=20";
  CmdResult refused = RunEellm(bad);
  EXPECT_NE(refused.exit_code, 0) << Describe(bad, refused);
  EXPECT_NE(refused.output.find("got 0, 20"), std::string::npos) << Describe(bad, refused);
}

TEST_F(CliTest, DashedFlagNamesWork) {
  const std::string ckpt = TrainTinyModel(2);
  ASSERT_FALSE(ckpt.empty());
  // --max-new-tokens both as --name=value and as --name value; the default is 200, so at most
  // 3 tokens means the dashed flag took effect.
  for (const std::string form : {"--max-new-tokens=3", "--max-new-tokens 3"}) {
    const std::string args =
        "generate --checkpoint=" + Quote(ckpt) + " " + form + " --exit-layers=1";
    CmdResult r = RunEellm(args);
    ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
    const int n = TokensGenerated(r.output, "early-exit");
    EXPECT_GE(n, 1) << Describe(args, r);
    EXPECT_LE(n, 3) << Describe(args, r);
  }
  // A dashed flag naming a non-existent exit layer is rejected, naming the value.
  const std::string args = "generate --checkpoint=" + Quote(ckpt) + " --exit-layers=2";
  CmdResult r = RunEellm(args);
  EXPECT_NE(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("\"2\""), std::string::npos) << Describe(args, r);
}

// Under mpirun, a bad layout stops every rank with one clear message, within seconds.
TEST_F(ParallelCliTest, WorldSizeNotTpPpDp) {
  ExpectLayoutError(3, kTinyModel, "--pp=2 --dp=2", {"world size 3", "2 * 2"});
}

TEST_F(ParallelCliTest, LayersNotDivisibleAmongStages) {
  ExpectLayoutError(2, R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 3, "num_heads": 2, "max_seq_len": 32})",
                    "--pp=2", {"num_layers 3", "pp 2"});
}

TEST_F(ParallelCliTest, HeadsNotDivisibleByTp) {
  ExpectLayoutError(2, R"({"style": "gpt", "vocab_size": 258, "hidden_size": 48,
      "num_layers": 2, "num_heads": 3, "max_seq_len": 32})",
                    "--tp=2", {"num_heads 3", "tp 2"});
}

TEST_F(ParallelCliTest, VocabNotDivisibleByTp) {
  ExpectLayoutError(2, R"({"style": "gpt", "vocab_size": 259, "hidden_size": 32,
      "num_layers": 2, "num_heads": 2, "max_seq_len": 32})",
                    "--tp=2", {"vocab_size 259", "tp 2"});
}

TEST_F(ParallelCliTest, ExitOnMissingLayer) {
  ExpectLayoutError(2, R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
      "num_layers": 2, "num_heads": 2, "max_seq_len": 32,
      "exits": [{"layer": 7}]})",
                    "--pp=2", {"layer 7"});
}

// A pipeline run through the CLI trains and writes one whole-model checkpoint.
TEST_F(ParallelCliTest, PipelineTrainsAndSaves) {
  ASSERT_TRUE(PrepareTinyData(0.2));
  const std::string args =
      "train --config=" + Quote(WriteConfig(kTinyModel, 2, ", \"micro_batch_size\": 1")) +
      " --pp=2";
  CmdResult r = RunEellm(args, Mpirun(2));
  EXPECT_EQ(r.exit_code, 0) << Describe(args, r);
  EXPECT_NE(r.output.find("tp 1 x pp 2 x dp 1"), std::string::npos) << Describe(args, r);
  EXPECT_TRUE(fs::exists(Path("run/step_00000002/shard_tp0_pp1.h5"))) << Describe(args, r);
  // The checkpoint holds the whole model: generation works from it on one process.
  CmdResult g = RunEellm("generate --checkpoint=" + Quote(Path("run")) + " --max-new-tokens=5");
  EXPECT_EQ(g.exit_code, 0) << g.output;
}

// A checkpoint holds tensors under their global names and shapes, so a run saved under one layout
// resumes under another: here pipeline-parallel (pp 2) -> data-parallel with ZeRO-1 (dp 2).
TEST_F(ParallelCliTest, ResumesUnderAnotherLayout) {
  ASSERT_TRUE(PrepareTinyData(0.2));
  const std::string config = WriteConfig(kTinyModel, 2, ", \"micro_batch_size\": 2");
  CmdResult a = RunEellm("train --config=" + Quote(config) + " --pp=2", Mpirun(2));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  const std::string args = "train --config=" + Quote(config) + " --dp=2 --zero1 --steps=4 " +
                           "--resume=" + Quote(Path("run"));
  CmdResult b = RunEellm(args, Mpirun(2));
  EXPECT_EQ(b.exit_code, 0) << Describe(args, b);
  EXPECT_NE(b.output.find("step     4/4"), std::string::npos) << Describe(args, b);
  EXPECT_EQ(b.output.find("step     1/4"), std::string::npos) << Describe(args, b);
}

}  // namespace
}  // namespace eellm
