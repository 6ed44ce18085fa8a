// End-to-end tests of what a training run draws and logs, through the `eellm` binary (as
// cli_test.cc): epoch sampling across a resume, Megatron's --eod-mask-loss, metrics.jsonl and
// TensorBoard events.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "checkpoints/sharded_checkpoint.h"
#include "gtest/gtest.h"
#include "launch/tensorboard_events.h"
#include "launch/training_data.h"
#include "nlohmann/json.hpp"
#include "tests/launch/cli_fixture.h"

namespace eellm {
namespace {

// What a checkpoint's train_state says was consumed; without it (or with a bad value), steps
// times the batch.
TEST(ConsumedSamplesTest, ReadsTheCheckpointsTrainState) {
  auto state = [](const std::string& data) {
    return std::map<std::string, std::string>{
        {"train_state", "{\"step\": 4, \"data\": " + data + "}"}};
  };
  EXPECT_EQ(ConsumedSamples(state("{\"sampler\": \"epochs\", \"consumed_samples\": 24}"), 4, 8),
            24);
  EXPECT_EQ(
      ConsumedSamples(state("{\"sampler\": \"random_rows\", \"consumed_samples\": 20}"), 4, 8), 20);
  EXPECT_EQ(ConsumedSamples(state("{\"sampler\": \"random_rows\", \"next_batch\": 4}"), 4, 8), 32);
  EXPECT_EQ(ConsumedSamples(state("{\"consumed_samples\": \"x\"}"), 4, 8), 32);
  EXPECT_EQ(ConsumedSamples(state("{\"consumed_samples\": -3}"), 4, 8), 32);
  EXPECT_EQ(ConsumedSamples({}, 4, 8), 32);
}

using cli::CliTest;
using cli::kTinyModel;
using cli::WriteFile;
using testing::CmdResult;
using testing::Describe;
using testing::Quote;
using testing::RunEellm;
namespace fs = std::filesystem;

// Epoch sampling (the default) goes on from the samples a checkpoint consumed, also when the
// resumed run's batch is larger (its train_state records them); --sampling=random draws random
// windows; a bad value is named.
TEST_F(CliTest, EpochSamplingGoesOnFromTheConsumedSamples) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string first = "train --config=" + Quote(WriteConfig(kTinyModel, 2));  // batch 4
  CmdResult a = RunEellm(first);
  ASSERT_EQ(a.exit_code, 0) << Describe(first, a);
  EXPECT_NE(a.output.find("each once per epoch), samples 0 to 8:"), std::string::npos) << a.output;
  std::string config = WriteConfig(kTinyModel, 4), text;
  {
    std::ifstream f(config);
    text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  const std::string batch4 = "\"batch_size\": 4";
  const size_t at = text.find(batch4);
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, batch4.size(), "\"batch_size\": 8");
  WriteFile(config, text);
  const std::string resume = "train --config=" + Quote(config) + " --resume=" + Quote(Path("run"));
  CmdResult b = RunEellm(resume);
  ASSERT_EQ(b.exit_code, 0) << Describe(resume, b);
  EXPECT_NE(b.output.find("samples 8 to 24:"), std::string::npos) << b.output;
  auto meta = ReadCheckpointMeta(Path("run"));
  ASSERT_TRUE(meta.ok()) << meta.status();
  const auto state = nlohmann::json::parse(meta->attrs["train_state"]);
  EXPECT_EQ(state["data"]["sampler"], "epochs") << state.dump();
  EXPECT_EQ(state["data"]["consumed_samples"], 24) << state.dump();

  const std::string random = "train --config=" + Quote(WriteConfig(kTinyModel, 1)) +
                             " --sampling=random --out=" + Quote(Path("random"));
  CmdResult c = RunEellm(random);
  ASSERT_EQ(c.exit_code, 0) << Describe(random, c);
  EXPECT_NE(c.output.find("at random offsets (with replacement)"), std::string::npos) << c.output;
  const std::string bad = "train --config=" + Quote(WriteConfig(kTinyModel, 1)) +
                          " --sampling=shuffle --out=" + Quote(Path("bad"));
  CmdResult d = RunEellm(bad);
  EXPECT_NE(d.exit_code, 0) << Describe(bad, d);
  EXPECT_NE(d.output.find("sampling \"shuffle\" is not epochs or random"), std::string::npos)
      << d.output;
}

// eod_mask_loss (and --eod-mask-loss) reach the run: on JSON-lines documents of a few words
// (end-of-text after each), the first step's losses change when the positions after each
// end-of-text are left out, as from the config file's "eod_mask_loss".
TEST_F(CliTest, EodMaskLossReachesTheRun) {
  std::string docs;
  for (int i = 0; i < 300; ++i) docs += absl::StrFormat("{\"text\": \"doc %d of the set\"}\n", i);
  WriteFile(Path("docs.jsonl"), docs);
  const std::string data = "data --input=" + Quote(Path("docs.jsonl")) +
                           " --output=" + Quote(Path("data/tiny")) + " --val-fraction=0.1";
  CmdResult d = RunEellm(data);
  ASSERT_EQ(d.exit_code, 0) << Describe(data, d);
  auto first_step = [](const std::string& out) {  // its losses, LR and gradient norm
    const size_t at = out.find("step     1/1 |"), end = out.find("tok/s", at);
    if (at == std::string::npos || end == std::string::npos) return std::string();
    const std::string line = out.substr(at, end - at);
    return line.substr(0, line.rfind('|'));
  };
  const std::string base = "train --config=" + Quote(WriteConfig(kTinyModel, 1));
  CmdResult plain = RunEellm(base + " --out=" + Quote(Path("plain")));
  CmdResult masked = RunEellm(base + " --eod-mask-loss --out=" + Quote(Path("masked")));
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  ASSERT_EQ(masked.exit_code, 0) << masked.output;
  ASSERT_NE(first_step(plain.output), "") << plain.output;
  ASSERT_NE(first_step(masked.output), "") << masked.output;
  EXPECT_NE(first_step(plain.output), first_step(masked.output));
  const std::string from_file =
      "train --config=" + Quote(WriteConfig(kTinyModel, 1, ", \"eod_mask_loss\": true")) +
      " --out=" + Quote(Path("from_file"));
  CmdResult f = RunEellm(from_file);
  ASSERT_EQ(f.exit_code, 0) << f.output;
  EXPECT_EQ(first_step(f.output), first_step(masked.output));
}

// hidden_dropout (and --hidden-dropout) reach the run: the first step's losses change, the
// config file's key gives what the flag gives, and a probability outside [0, 1) is named.
TEST_F(CliTest, HiddenDropoutReachesTheRun) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  auto first_step = [](const std::string& out) {  // its losses, LR and gradient norm
    const size_t at = out.find("step     1/1 |"), end = out.find("tok/s", at);
    if (at == std::string::npos || end == std::string::npos) return std::string();
    const std::string line = out.substr(at, end - at);
    return line.substr(0, line.rfind('|'));
  };
  const std::string base = "train --config=" + Quote(WriteConfig(kTinyModel, 1));
  CmdResult plain = RunEellm(base + " --out=" + Quote(Path("plain")));
  CmdResult dropped = RunEellm(base + " --hidden-dropout=0.2 --out=" + Quote(Path("dropped")));
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  ASSERT_EQ(dropped.exit_code, 0) << dropped.output;
  ASSERT_NE(first_step(plain.output), "") << plain.output;
  EXPECT_NE(first_step(plain.output), first_step(dropped.output));
  const std::string from_file =
      "train --config=" + Quote(WriteConfig(kTinyModel, 1, ", \"hidden_dropout\": 0.2")) +
      " --out=" + Quote(Path("from_file"));
  CmdResult f = RunEellm(from_file);
  ASSERT_EQ(f.exit_code, 0) << f.output;
  EXPECT_EQ(first_step(f.output), first_step(dropped.output));
  const std::string bad = base + " --hidden-dropout=1 --out=" + Quote(Path("bad"));
  CmdResult b = RunEellm(bad);
  EXPECT_NE(b.exit_code, 0) << Describe(bad, b);
  EXPECT_NE(b.output.find("hidden_dropout must be in [0, 1), got 1"), std::string::npos)
      << b.output;
}

// lr_warmup_fraction (Megatron's --lr-warmup-fraction) warms up over that fraction of the
// decay's steps: 0.4 of 5 steps trains as warmup_steps 2; both at once, and fractions outside
// [0, 1), are refused.
TEST_F(CliTest, LrWarmupFractionSetsTheWarmup) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  auto lines = [](const std::string& out) {  // the step lines up to their speed
    std::string all;
    for (size_t at = out.find("step "); at != std::string::npos; at = out.find("step ", at + 1)) {
      const size_t end = out.find("tok/s", at);
      if (end == std::string::npos) break;
      all += out.substr(at, out.rfind('|', end) - at) + "\n";
    }
    return all;
  };
  const std::string steps2 = "train --config=" + Quote(WriteConfig(kTinyModel, 5));
  CmdResult a = RunEellm(steps2 + " --out=" + Quote(Path("a")));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  std::string text;
  {
    std::ifstream f(Path("config.json"));
    text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  const std::string warmup = "\"warmup_steps\": 2";
  const size_t at = text.find(warmup);
  ASSERT_NE(at, std::string::npos) << text;
  WriteFile(Path("both.json"),
            std::string(text).replace(at, warmup.size(), warmup + ", \"lr_warmup_fraction\": 0.4"));
  text.replace(at, warmup.size(), "\"lr_warmup_fraction\": 0.4");
  WriteFile(Path("fraction.json"), text);
  CmdResult b =
      RunEellm("train --config=" + Quote(Path("fraction.json")) + " --out=" + Quote(Path("b")));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  ASSERT_NE(lines(a.output), "");
  EXPECT_EQ(lines(a.output), lines(b.output));
  CmdResult c = RunEellm("train --config=" + Quote(Path("both.json")));
  EXPECT_NE(c.exit_code, 0);
  EXPECT_NE(c.output.find("give warmup_steps or lr_warmup_fraction, not both"), std::string::npos)
      << c.output;
  text.replace(text.find("0.4"), 3, "1.5");
  WriteFile(Path("whole.json"), text);
  CmdResult d = RunEellm("train --config=" + Quote(Path("whole.json")));
  EXPECT_NE(d.exit_code, 0);
  EXPECT_NE(d.output.find("lr_warmup_fraction must be in [0, 1), got 1.5"), std::string::npos)
      << d.output;
}

// EE-Tuning's hidden-state cache from the command line: the run says what it keeps, and its
// steps after the first epoch run from it; settings that rule it out are named.
TEST_F(CliTest, TuneCacheServesTheStepsAfterTheFirstEpoch) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string config = Quote(WriteConfig(kTinyModel, 100, ", \"freeze_backbone\": true"));
  CmdResult a = RunEellm("train --config=" + config + " --tune-cache-mb=4");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_NE(a.output.find("194 training windows x 4.0 KiB = 776.0 KiB"), std::string::npos)
      << a.output;
  const size_t at = a.output.find("trained 100 steps (");
  ASSERT_NE(at, std::string::npos) << a.output;
  const int served = std::atoi(a.output.c_str() + at + std::strlen("trained 100 steps ("));
  EXPECT_GT(served, 40) << a.output;  // 194 windows, 4 a step: from step 49 on
  // As announced at the start.
  EXPECT_NE(a.output.find("; " + std::to_string(served) +
                          " of the run's 100 steps will run from it, without the backbone"),
            std::string::npos)
      << a.output;
  EXPECT_NE(a.output.find(" from the tune cache)", at), std::string::npos) << a.output;
  CmdResult b = RunEellm("train --config=" + config + " --tune-cache-mb=4 --steps=5");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("tune cache: off: only 0 of the run's 5 steps would run from it"),
            std::string::npos)
      << b.output;
  CmdResult c =
      RunEellm("train --config=" + Quote(WriteConfig(kTinyModel, 5)) + " --tune-cache-mb=4");
  EXPECT_NE(c.exit_code, 0);
  EXPECT_NE(c.output.find("tune_cache_mb 4 caches a frozen backbone's hidden states: it needs "
                          "freeze_backbone"),
            std::string::npos)
      << c.output;
}

// <out>/metrics.jsonl: a JSON line per logged step (the losses printed, lr, grad norm, speed)
// and per validation, appended by a resumed run.
TEST_F(CliTest, MetricsFileHoldsEveryLoggedStepAndValidation) {
  const std::string ckpt = TrainTinyModel(4);
  ASSERT_FALSE(ckpt.empty());
  CmdResult r = RunEellm("train --config=" + Quote(Path("config.json")) +
                         " --steps=6 --resume=" + Quote(Path("run")));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(Path("run/metrics.jsonl"));
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  // The first run: validation at 0, steps 1-4 (its validation at 4 dropped); the resumed one:
  // validation at 4, steps 5 and 6, validation at 6.
  const std::vector<std::pair<int, bool>> want = {{0, false}, {1, true}, {2, true},
                                                  {3, true},  {4, true}, {4, false},
                                                  {5, true},  {6, true}, {6, false}};
  ASSERT_EQ(lines.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(lines[i]["step"], want[i].first) << i;
    const nlohmann::json& losses = lines[i][want[i].second ? "loss" : "val_loss"];
    EXPECT_TRUE(losses.contains("final") && losses.contains("exit@1")) << lines[i];
    if (want[i].second) {
      EXPECT_GT(lines[i]["lr"].get<double>(), 0) << lines[i];
      EXPECT_GT(lines[i]["grad_norm"].get<double>(), 0) << lines[i];
    }
  }
  // The console's step 6 line shows the same final loss.
  const std::string printed =
      absl::StrFormat("step     6/6 | final %.4f", lines[7]["loss"]["final"].get<double>());
  EXPECT_NE(r.output.find(printed), std::string::npos) << printed << "\n" << r.output;
}

// --tensorboard-dir (Megatron's): an event file there holds what metrics.jsonl holds, as
// TensorBoard scalars at the same steps.
TEST_F(CliTest, TensorBoardEventsHoldTheLoggedValues) {
  ASSERT_TRUE(PrepareTinyData(0.1));
  const std::string args = "train --config=" + Quote(WriteConfig(kTinyModel, 3)) +
                           " --tensorboard-dir=" + Quote(Path("tb"));
  CmdResult r = RunEellm(args);
  ASSERT_EQ(r.exit_code, 0) << Describe(args, r);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(Path("tb"))) files.push_back(e.path().string());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_NE(r.output.find("tensorboard: " + files[0]), std::string::npos) << r.output;
  auto scalars = ReadTensorBoardScalars(files[0]);
  ASSERT_TRUE(scalars.ok()) << scalars.status();
  std::ifstream in(Path("run/metrics.jsonl"));
  int compared = 0;
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    const int step = j["step"];
    std::vector<std::pair<std::string, double>> want;
    const char* kind = j.contains("loss") ? "loss" : "val_loss";
    for (auto it = j[kind].begin(); it != j[kind].end(); ++it) {
      want.push_back({std::string(kind) + "/" + it.key(), it.value().get<double>()});
    }
    if (j.contains("loss")) {
      for (const char* k : {"lr", "grad_norm", "tokens_per_s"}) want.push_back({k, j[k]});
    }
    for (const auto& [tag, value] : want) {
      const auto found = std::find_if(scalars->begin(), scalars->end(), [&](const auto& s) {
        return s.step == step && s.tag == tag;
      });
      ASSERT_NE(found, scalars->end()) << tag << " at step " << step;
      EXPECT_EQ(found->value, static_cast<float>(value)) << tag << " at step " << step;
      ++compared;
    }
  }
  // val at 0 and 3 (final, exit@1), steps 1-3 (two losses, lr, grad_norm, tokens_per_s).
  EXPECT_EQ(compared, 2 * 2 + 3 * 5);
  EXPECT_EQ(static_cast<int>(scalars->size()), compared);
}

}  // namespace
}  // namespace eellm
