// EE-Tuning's hidden-state cache (train.tune_cache_mb): the windows of a tiny data set come back
// every few steps, so after the first epoch the steps run from the cache, without the backbone.
// What they compute must be what the full steps compute (the rows read back are the rows the
// frozen backbone made): every step's losses, the gradient norms and the final parameters are
// compared with a run without the cache. Also: the cache's storage,
// and the settings that rule it out, named.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "launch/trainer.h"
#include "launch/training_data.h"
#include "models/token_file.h"
#include "models/tokenizer.h"
#include "models/tune_input_cache.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;

TEST(TuneInputCache, AdmitsWhileThereIsRoomAndKeepsRowsPerChunk) {
  TuneInputCache cache(2, {3, 0, 2});
  EXPECT_EQ(cache.BytesPerWindow(), 5 * sizeof(float));
  EXPECT_TRUE(cache.Admit(7));
  EXPECT_FALSE(cache.Admit(7));  // held already
  EXPECT_TRUE(cache.Admit(2));
  EXPECT_FALSE(cache.Admit(9));  // full
  EXPECT_TRUE(cache.Holds(7) && cache.Holds(2) && !cache.Holds(9));
  EXPECT_EQ(cache.size(), 2);
  for (int w : {7, 2}) {
    for (int k = 0; k < 3; ++k) cache.Rows(0, w)[k] = w * 10 + k;
    for (int k = 0; k < 2; ++k) cache.Rows(2, w)[k] = -(w * 10 + k);
  }
  EXPECT_EQ(cache.Rows(0, 7)[2], 72);
  EXPECT_EQ(cache.Rows(0, 2)[0], 20);
  EXPECT_EQ(cache.Rows(2, 7)[1], -71);
  EXPECT_EQ(cache.Rows(1, 2), nullptr);  // a chunk that keeps nothing
  EXPECT_DEATH(cache.Rows(0, 9), "window 9 is not in the tune cache");
}

class TuneCacheRun : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("eellm_tune_cache_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    std::ofstream f(dir_ / "text.txt");
    for (int i = 0; i < 14; ++i) f << "And the evening " << i * 37 % 100 << " and the morning.\n";
    f.close();
    ByteTokenizer tok;
    auto r = PrepareTokenData((dir_ / "text.txt").string(), tok, (dir_ / "data").string(), 0.2);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A tiny model of `style` with exits of every kind (a post MLP exit reads its layer's
  // attention residual), the deepest at `deepest`, tuned on a frozen random backbone for
  // `steps` steps of 4 x 16 tokens.
  RunConfig Config(const std::string& style, int deepest, int steps, int cache_mb) {
    const std::string json = R"({"model": {"style": ")" + style + R"(",
        "vocab_size": 258, "hidden_size": 32, "num_layers": 6, "num_heads": 4,
        "num_kv_heads": )" + (style == "gpt" ? "4" : "2") +
                             R"(, "max_seq_len": 32,
        "exits": [{"layer": 1, "kind": "linear", "position": "pre", "loss_weight": 0.2},
                  {"layer": 1, "kind": "norm", "tied": true, "loss_weight": 0.5},
                  {"layer": 2, "kind": "mlp", "loss_weight": 0.3},
                  {"layer": 4, "kind": "mlp", "position": "pre", "loss_weight": 0.3},
                  {"layer": )" +
                             std::to_string(deepest) +
                             R"(, "kind": "block", "loss_weight": 0.2}]},
      "train": {"batch_size": 4, "seq_len": 16, "steps": )" +
                             std::to_string(steps) + R"(, "lr": 0.01, "warmup_steps": 1,
        "eval_batches": 1, "log_interval": 1, "eval_interval": 0, "freeze_backbone": true,
        "tune_cache_mb": )" + std::to_string(cache_mb) +
                             R"(, "data": ")" + (dir_ / "data").string() + R"("}})";
    auto rc = ParseRunConfig(json);
    EXPECT_TRUE(rc.ok()) << rc.status();
    return *rc;
  }

  struct Result {
    std::vector<std::vector<double>> losses;
    std::vector<double> grad_norms;
    std::vector<float> params;
    int64_t cached_steps = -1;
  };
  Result Train(RunConfig rc, const std::string& out, const std::string& resume = "") {
    Result r;
    rc.train.out = (dir_ / out).string();
    TrainOptions opts;
    opts.resume = resume;
    opts.verbose = false;
    opts.step_losses = &r.losses;
    opts.step_grad_norms = &r.grad_norms;
    opts.final_params = &r.params;
    auto s = RunTraining(rc, opts);
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) r.cached_steps = s->tune_cached_steps;
    return r;
  }

  // Steps [start, rc.train.steps) whose windows were all read by earlier steps from `start`:
  // the ones the cache serves (none when under a tenth, as the run then leaves it off).
  int64_t StepsAfterTheirWindows(const RunConfig& rc, int start = 0) {
    auto data = LoadTrainingData(rc.train, rc.model.vocab_size, false);
    EXPECT_TRUE(data.ok()) << data.status();
    if (!data.ok()) return -1;
    std::set<int64_t> seen;
    int64_t served = 0;
    const int b = rc.train.batch_size;
    std::vector<int64_t> w(b);
    for (int step = start; step < rc.train.steps; ++step) {
      data->train.EpochWindowIds(rc.train.seed, int64_t{step} * b, b, rc.train.seq_len, w.data());
      bool all = true;
      for (int64_t x : w) all = all && seen.count(x) != 0;
      served += all;
      seen.insert(w.begin(), w.end());
    }
    return served * 10 >= rc.train.steps - start ? served : 0;
  }

  fs::path dir_;
};

// One sequence per microbatch: each window's hidden states are computed at the same rows every
// time, so the cached steps are bit-identical. Four per microbatch: a window comes back at
// another row of the GEMMs, whose BLAS kernels may round it differently (the backbone's own
// rounding, ~1e-7 relative), so the runs agree within the layout tests' bounds.
TEST_F(TuneCacheRun, StepsAfterTheFirstEpochComputeWhatTheBackboneWould) {
  for (const std::string style : {"gpt", "llama"}) {
    for (int deepest : {4, 5}) {
      for (int micro : {1, 0}) {
        SCOPED_TRACE(style + " deepest exit at layer " + std::to_string(deepest) +
                     (micro == 1 ? ", 1 sequence per microbatch" : ", 4 per microbatch"));
        RunConfig plain_rc = Config(style, deepest, 24, 0);
        plain_rc.train.micro_batch_size = micro;
        auto data = LoadTrainingData(plain_rc.train, plain_rc.model.vocab_size, false);
        ASSERT_TRUE(data.ok()) << data.status();
        ASSERT_LT(data->train.Windows(16) * 2, 24 * 4) << "the run must take over two epochs";
        RunConfig cached_rc = plain_rc;
        cached_rc.train.tune_cache_mb = 16;
        const Result plain = Train(plain_rc, "plain");
        const Result cached = Train(cached_rc, "cached");
        EXPECT_EQ(plain.cached_steps, 0);
        EXPECT_EQ(cached.cached_steps, StepsAfterTheirWindows(plain_rc));
        EXPECT_GT(cached.cached_steps, 8);
        ASSERT_EQ(cached.losses.size(), plain.losses.size());
        const double tol = micro == 1 ? 0 : 1e-5;
        for (size_t s = 0; s < plain.losses.size(); ++s) {
          for (size_t h = 0; h < plain.losses[s].size(); ++h) {
            EXPECT_NEAR(cached.losses[s][h], plain.losses[s][h], tol * plain.losses[s][h])
                << "step " << s << " head " << h;
          }
          EXPECT_NEAR(cached.grad_norms[s], plain.grad_norms[s], tol * plain.grad_norms[s])
              << "step " << s;
        }
        ASSERT_EQ(cached.params.size(), plain.params.size());
        double most = 0;
        for (size_t i = 0; i < plain.params.size(); ++i) {
          most = std::max(most, std::fabs(double{cached.params[i]} - plain.params[i]));
        }
        EXPECT_LE(most, micro == 1 ? 0 : 3e-4);  // 3% of lr, as in the layout tests
      }
    }
  }
}

// A run stopped at step 12 and resumed to 24 refills the cache from the resumed step on and
// computes what the uninterrupted run without the cache does, bit for bit.
TEST_F(TuneCacheRun, AResumedRunRefillsItAndGoesOnAsTheWholeRun) {
  RunConfig rc = Config("llama", 4, 24, 0);
  rc.train.micro_batch_size = 1;
  rc.train.lr_decay_steps = 24;  // the first half's schedule is the whole run's
  const Result whole = Train(rc, "whole");
  RunConfig first = rc;
  first.train.tune_cache_mb = 16;
  first.train.steps = 12;
  const Result a = Train(first, "run");
  RunConfig rest = rc;
  rest.train.tune_cache_mb = 16;
  const Result b = Train(rest, "run", (dir_ / "run" / "step_00000012").string());
  EXPECT_EQ(a.cached_steps, StepsAfterTheirWindows(first));
  EXPECT_EQ(b.cached_steps, StepsAfterTheirWindows(rest, 12));
  EXPECT_GT(b.cached_steps, 0);
  ASSERT_EQ(a.losses.size() + b.losses.size(), whole.losses.size());
  for (size_t s = 0; s < whole.losses.size(); ++s) {
    const bool later = s >= a.losses.size();
    EXPECT_EQ(later ? b.losses[s - a.losses.size()] : a.losses[s], whole.losses[s]) << "step " << s;
  }
  EXPECT_TRUE(b.params == whole.params);
}

TEST_F(TuneCacheRun, IsOffWhenNoWindowComesBack) {
  RunConfig rc = Config("gpt", 4, 1, 16);
  auto data = LoadTrainingData(rc.train, rc.model.vocab_size, false);
  ASSERT_TRUE(data.ok()) << data.status();
  rc.train.steps = static_cast<int>(data->train.Windows(16) / 4);  // one epoch at most
  Result r = Train(rc, "short");
  EXPECT_EQ(r.cached_steps, 0);
  EXPECT_EQ(r.losses.size(), static_cast<size_t>(rc.train.steps));
}

TEST(ValidateTuneCache, NamesWhatRulesItOut) {
  RunConfig rc;
  rc.model.num_layers = 4;
  rc.model.num_heads = 4;
  rc.model.num_kv_heads = 4;
  rc.model.vocab_size = 256;
  rc.model.ffn_hidden_size = 64;
  rc.train.tune_cache_mb = 64;
  rc.train.dp = 1;
  auto message = [&] { return std::string(ValidateLayout(rc).message()); };
  EXPECT_NE(message().find("tune_cache_mb 64 caches a frozen backbone's hidden states: it needs "
                           "freeze_backbone"),
            std::string::npos)
      << message();
  rc.train.freeze_backbone = true;
  EXPECT_TRUE(ValidateLayout(rc).ok()) << message();
  rc.train.sampling = "random";
  EXPECT_NE(message().find("needs sampling \"epochs\""), std::string::npos) << message();
  rc.train.sampling = "epochs";
  rc.train.hidden_dropout = 0.1f;
  EXPECT_NE(message().find("with hidden_dropout 0.1"), std::string::npos) << message();
  rc.train.hidden_dropout = 0;
  rc.train.dp = 2;
  EXPECT_NE(message().find("tune_cache_mb needs dp 1 (got dp 2)"), std::string::npos) << message();
  rc.train.dp = 1;
  rc.train.tune_cache_mb = -1;
  EXPECT_NE(message().find("tune_cache_mb must be >= 0 (0 = off), got -1"), std::string::npos)
      << message();
}

}  // namespace
}  // namespace eellm
