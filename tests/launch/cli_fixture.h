// The fixture of the `eellm` binary's end-to-end tests (cli_test.cc, serve_cli_test.cc): a
// temporary directory per test, a tiny model and text, training it, launching `eellm serve` in
// the background, and mpirun command lines.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/launch/run_eellm.h"

namespace eellm::cli {

namespace fs = std::filesystem;
using testing::CmdResult;
using testing::Describe;
using testing::Quote;
using testing::RunEellm;

inline void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream f(path, std::ios::binary);
  ASSERT_TRUE(f) << "cannot write " << path;
  f << content;
}

// The tiny model used throughout: GPT style, hidden 32, 2 layers, 2 heads, one exit after
// layer 1 (norm head, post).
inline constexpr char kTinyModel[] = R"({"style": "gpt", "vocab_size": 258, "hidden_size": 32,
    "num_layers": 2, "num_heads": 2, "max_seq_len": 32,
    "exits": [{"layer": 1, "kind": "norm", "position": "post"}]})";

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string tmpl =
        (fs::temp_directory_path() / (std::string("eellm_cli_") + info->name() + "_XXXXXX"))
            .string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    ASSERT_NE(mkdtemp(buf.data()), nullptr) << "mkdtemp failed for " << tmpl;
    dir_ = buf.data();
  }

  void TearDown() override {
    if (dir_.empty()) return;
    if (HasFailure()) {
      std::printf("keeping %s for inspection\n", dir_.c_str());
    } else {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // A run config file with the given "model" body and the tiny "train" section (data under
  // the test dir, `steps` steps), plus `extra_train` (",\"key\": value" pairs) appended.
  std::string WriteConfig(const std::string& model, int steps = 5,
                          const std::string& extra_train = "") {
    const std::string path = Path("config.json");
    std::ostringstream s;
    s << "{\"model\": " << model << ",\n \"train\": {\"data\": \"" << Path("data/tiny")
      << "\", \"out\": \"" << Path("run") << "\", \"batch_size\": 4, \"seq_len\": 32, "
      << "\"steps\": " << steps << ", \"warmup_steps\": 2, \"log_interval\": 1, "
      << "\"eval_interval\": 0, \"eval_batches\": 2" << extra_train << "}}\n";
    WriteFile(path, s.str());
    return path;
  }

  // A few KB of repetitive English text.
  std::string WriteTinyText() {
    static const char* kLines[] = {
        "In the beginning the small model read the same short lines again and again.\n",
        "The quick brown fox jumps over the lazy dog.\n",
        "And the evening and the morning were the first day.\n",
        "A tiny network learns which letter tends to follow which.\n",
    };
    std::string text;
    for (int i = 0; i < 30; ++i) {
      for (const char* l : kLines) text += l;
    }
    const std::string path = Path("text.txt");
    WriteFile(path, text);
    return path;
  }

  // Writes the tiny text and runs `eellm data` on it (prefix data/tiny); false on failure.
  bool PrepareTinyData(double val_fraction) {
    const std::string text = WriteTinyText();
    const std::string args = "data --input=" + Quote(text) +
                             " --output=" + Quote(Path("data/tiny")) +
                             " --val-fraction=" + std::to_string(val_fraction);
    CmdResult d = RunEellm(args);
    EXPECT_EQ(d.exit_code, 0) << Describe(args, d);
    return d.exit_code == 0;
  }

  // `eellm serve <args> --host=127.0.0.1 --port=0` in the background (after `launcher`, e.g.
  // mpirun), its output in <name>.out; returns the pid of what was started (0 on failure).
  pid_t Launch(const std::string& args, const std::string& launcher, const std::string& name) {
    const std::string cmd = launcher + Quote(testing::kEellm) + " serve " + args +
                            " --host=127.0.0.1 --port=0 > " + Quote(Path(name + ".out")) +
                            " 2>&1 & echo $! > " + Quote(Path(name + ".pid"));
    if (std::system(cmd.c_str()) != 0) return 0;
    std::ifstream pf(Path(name + ".pid"));
    pid_t pid = 0;
    pf >> pid;
    return pid;
  }
  static std::string ReadText(const std::string& path) {
    std::ifstream f(path);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  struct Server {
    pid_t pid = 0;    // what was started (the server, or mpirun)
    pid_t rank0 = 0;  // the server process that prints (rank 0 under mpirun)
    int port = 0;     // 0: it did not start within 30 s
    std::string output;
  };
  // Launch, then waits for the "serving ... on http://127.0.0.1:PORT ...; pid N" line.
  Server StartServer(const std::string& args, const std::string& launcher,
                     const std::string& name) {
    Server s;
    s.pid = Launch(args, launcher, name);
    std::smatch m;
    const std::regex serving(R"(127\.0\.0\.1:(\d+):.*; pid (\d+))");
    for (int i = 0; i < 300 && s.pid > 0; ++i) {
      s.output = ReadText(Path(name + ".out"));
      if (std::regex_search(s.output, m, serving)) {
        s.port = std::stoi(m[1]);
        s.rank0 = std::stoi(m[2]);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return s;
  }
  // Sends SIGTERM to `signalled`; true when `waited` has ended within 10 s (else SIGKILL).
  static bool StopProcess(pid_t signalled, pid_t waited) {
    kill(signalled, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (kill(waited, 0) != 0) return true;
    }
    kill(waited, SIGKILL);
    return false;
  }
  // PUT /api on the local port; the answer's body ("" without one).
  static std::string Put(int port, const std::string& body) {
    httplib::Client client("127.0.0.1", port);
    client.set_read_timeout(60, 0);
    auto res = client.Put("/api", body, "application/json");
    return res ? res->body : "";
  }

  // Prepares the token files and trains the tiny model for `steps` steps; returns the path of
  // the checkpoint's one shard file, itself a complete single-file checkpoint ("" after a test
  // failure).
  std::string TrainTinyModel(int steps) {
    if (!PrepareTinyData(0.1)) return "";
    const std::string train_args = "train --config=" + Quote(WriteConfig(kTinyModel, steps));
    CmdResult t = RunEellm(train_args);
    EXPECT_EQ(t.exit_code, 0) << Describe(train_args, t);
    if (t.exit_code != 0) return "";
    EXPECT_TRUE(fs::exists(Path("run/latest"))) << Describe(train_args, t);
    const std::string ckpt = Path(absl::StrFormat("run/step_%08d/shard_tp0_pp0.h5", steps));
    EXPECT_TRUE(fs::exists(ckpt)) << Describe(train_args, t);
    return fs::exists(ckpt) ? ckpt : "";
  }

  // Adds a norm exit before layer 1 to the checkpoint in run/ (`convert add-exits`, heads copied
  // from the final ones) and writes it to `out`; returns the extended model config the command
  // prints ("" after a test failure).
  std::string AddPreExitAtLayer1(const std::string& out) {
    const std::string add = "convert add-exits --input=" + Quote(Path("run")) +
                            " --output=" + Quote(Path(out)) +
                            " --exits='[{\"layer\": 1, \"kind\": \"norm\", \"position\": \"pre\"}]'"
                            " --init=copy-final";
    CmdResult a = RunEellm(add);
    EXPECT_EQ(a.exit_code, 0) << Describe(add, a);
    const size_t at = a.output.find("model config: ");
    EXPECT_NE(at, std::string::npos) << a.output;
    if (a.exit_code != 0 || at == std::string::npos) return "";
    const size_t begin = at + std::strlen("model config: ");
    return a.output.substr(begin, a.output.find('\n', begin) - begin);
  }

  // Runs `eellm train` on a config with the given model body and expects a non-zero exit whose
  // output contains every string in `needles`.
  void ExpectTrainConfigError(const std::string& model, const std::vector<std::string>& needles,
                              const std::string& extra_train = "") {
    const std::string args = "train --config=" + Quote(WriteConfig(model, 5, extra_train));
    CmdResult r = RunEellm(args);
    EXPECT_NE(r.exit_code, 0) << Describe(args, r);
    for (const std::string& n : needles) {
      EXPECT_NE(r.output.find(n), std::string::npos) << "expected \"" << n << "\" in the output\n"
                                                     << Describe(args, r);
    }
  }

  std::string dir_;
};

// The number N in "[<label>] N tokens", or -1.
inline int TokensGenerated(const std::string& output, const std::string& label) {
  std::smatch m;
  const std::regex re("\\[" + label + "\\] ([0-9]+) tokens");
  if (!std::regex_search(output, m, re)) return -1;
  return std::stoi(m[1]);
}

// Under mpirun: ExpectLayoutError checks that a bad layout stops every rank with one clear
// message and a non-zero exit, within seconds.
class ParallelCliTest : public CliTest {
 protected:
  void TearDown() override {
    if (!session_dir_.empty()) {
      std::error_code ec;
      fs::remove_all(session_dir_, ec);
    }
    CliTest::TearDown();
  }

  // The mpirun prefix of a command (2-core machines: oversubscribed, yielding; killed after
  // 60 s). Each test's jobs keep Open MPI's session files in a directory of their own: under
  // a shared /tmp/ompi.<host>.<uid>, a job ending removes that directory while a job of a test
  // running beside it creates its own in it (mkdir fails, the job never starts). The path is
  // short: Open MPI's sockets live in it.
  std::string Mpirun(int np) {
    if (session_dir_.empty()) {
      char tmpl[] = "/tmp/eellm_ompi_XXXXXX";
      if (mkdtemp(tmpl) == nullptr) ADD_FAILURE() << "mkdtemp failed for /tmp/eellm_ompi_XXXXXX";
      session_dir_ = tmpl;
    }
    return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
           "OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_orte_tmpdir_base=" +
           session_dir_ + " OMP_NUM_THREADS=1 timeout 60 mpirun --oversubscribe -np " +
           std::to_string(np) + " ";
  }

  // Trains the tiny model for 4 steps under mpirun with tp 2 into run/; false on failure.
  bool TrainTinyModelTp2() {
    if (!PrepareTinyData(0.2)) return false;
    const std::string train =
        "train --config=" + Quote(WriteConfig(kTinyModel, 4, ", \"micro_batch_size\": 2")) +
        " --tp=2";
    CmdResult t = RunEellm(train, Mpirun(2));
    EXPECT_EQ(t.exit_code, 0) << Describe(train, t);
    return t.exit_code == 0;
  }

  void ExpectLayoutError(int np, const std::string& model, const std::string& flags,
                         const std::vector<std::string>& needles) {
    ASSERT_TRUE(PrepareTinyData(0.2));
    const std::string args = "train --config=" + Quote(WriteConfig(model, 2)) + " " + flags;
    const auto start = std::chrono::steady_clock::now();
    CmdResult r = RunEellm(args, Mpirun(np));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_NE(r.exit_code, 0) << Describe(args, r);
    EXPECT_NE(r.exit_code, 124) << "timed out (hang)\n" << Describe(args, r);
    EXPECT_LT(seconds, 30.0) << Describe(args, r);
    for (const std::string& n : needles) {
      EXPECT_NE(r.output.find(n), std::string::npos) << "expected \"" << n << "\"\n"
                                                     << Describe(args, r);
    }
  }

 private:
  std::string session_dir_;  // Open MPI's session files (made by the first Mpirun call)
};

}  // namespace eellm::cli
