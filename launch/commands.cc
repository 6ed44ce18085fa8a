#include "launch/commands.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "parallel/comm/mpi_runtime.h"

namespace eellm {
namespace {

struct Command {
  const char* name;
  const char* source;               // file defining its flags
  std::vector<const char*> shared;  // shared flags it uses (launch/shared_flags.cc)
  const char* summary;
  int (*run)();
};

const Command kCommands[] = {
    {"data",
     "cmd_data.cc",
     {"input", "output", "tokenizer"},
     "turn a text file into train/validation token files",
     RunDataCommand},
    {"train",
     "cmd_train.cc",
     {"backend", "steps", "tp", "pp"},
     "train an early-exit model from a JSON run config",
     RunTrainCommand},
    {"generate",
     "cmd_generate.cc",
     {"checkpoint", "backend", "seed", "temperature", "draft_tokens", "draft_confidence",
      "max_model_len", "tp", "pp"},
     "generate text from a checkpoint, with early exit or self-speculative decoding (tensor- and "
     "pipeline-parallel under mpirun)",
     RunGenerateCommand},
    {"serve",
     "cmd_serve.cc",
     {"checkpoint", "backend", "seed", "max_model_len", "tp", "pp"},
     "serve a checkpoint over HTTP (EE-LLM's PUT /api), batching concurrent requests",
     RunServeCommand},
    {"convert",
     "cmd_convert.cc",
     {"input", "output", "tp", "pp", "seed", "exit", "tokenizer"},
     "convert checkpoints: Hugging Face <-> eellm, Megatron-LM/EE-LLM -> eellm, add exits, move "
     "exits, reshard",
     RunConvertCommand},
    {"logits",
     "cmd_logits.cc",
     {"checkpoint", "backend", "exit"},
     "print one head's logits for token ids as JSON (model checks)",
     RunLogitsCommand},
    {"bench",
     "cmd_bench.cc",
     {"checkpoint", "backend", "seed", "steps", "temperature", "draft_tokens", "draft_confidence",
      "max_model_len", "tp", "pp"},
     "benchmarks: train (step speed, MFU), generate (batched vs one at a time, speculative vs "
     "full; under mpirun a pipeline vs one process), attention (the attention kernels alone), "
     "checkpoint",
     RunBenchCommand},
};

void PrintTopUsage() {
  std::printf(
      "eellm: train and serve early-exit LLMs\n\n"
      "usage: eellm <command> [--flag=value ...]\n\ncommands:\n");
  for (const Command& c : kCommands) std::printf("  %-10s %s\n", c.name, c.summary);
  std::printf(
      "\n`eellm <command> --help` lists a command's flags. Flag names accept '-' or '_'.\n");
}

void PrintCommandUsage(const Command& cmd) {
  std::printf("usage: eellm %s [--flag=value ...]\n%s\n\nflags:\n", cmd.name, cmd.summary);
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    const bool shared = std::find_if(cmd.shared.begin(), cmd.shared.end(),
                                     [&](const char* s) { return name == s; }) != cmd.shared.end();
    if (!absl::EndsWith(flag->Filename(), cmd.source) && !shared) continue;
    rows.emplace_back(std::string(name),
                      absl::StrCat(flag->Help(), " (default: ", flag->DefaultValue(), ")"));
  }
  std::sort(rows.begin(), rows.end());
  for (const auto& [name, help] : rows) std::printf("  --%-18s %s\n", name.c_str(), help.c_str());
}

std::set<std::string>& GivenFlags() {
  static std::set<std::string> given;
  return given;
}

// The flag an argument names ("--name=value", "--name", "--noname" for a bool; null when it names
// none, which absl's parser then reports).
const absl::CommandLineFlag* NamedFlag(const std::string& arg) {
  if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) return nullptr;
  const std::string name = arg.substr(2, arg.find('=') - 2);
  const absl::CommandLineFlag* f = absl::FindCommandLineFlag(name);
  if (f == nullptr && absl::StartsWith(name, "no")) f = absl::FindCommandLineFlag(name.substr(2));
  return f;
}

// Whether a flag is the command's: defined in its source or a shared flag it uses (absl's own
// flags, e.g. --flagfile, count as everyone's).
bool CommandHasFlag(const Command& cmd, const absl::CommandLineFlag& flag) {
  const std::string file = flag.Filename();
  const bool ours =
      absl::StrContains(file, "launch/cmd_") || absl::EndsWith(file, "shared_flags.cc");
  if (!ours || absl::EndsWith(file, cmd.source)) return true;
  return std::find_if(cmd.shared.begin(), cmd.shared.end(),
                      [&](const char* s) { return flag.Name() == s; }) != cmd.shared.end();
}

// "--max-new-tokens=5" -> "--max_new_tokens=5".
std::string NormalizeFlag(const char* arg) {
  std::string s = arg;
  if (s.size() < 3 || s.compare(0, 2, "--") != 0) return s;
  size_t end = s.find('=');
  if (end == std::string::npos) end = s.size();
  for (size_t i = 2; i < end; ++i) {
    if (s[i] == '-') s[i] = '_';
  }
  return s;
}

}  // namespace

bool FlagOnCommandLine(absl::string_view name) { return GivenFlags().count(std::string(name)) > 0; }

int FailCommand(const absl::Status& s, bool under_launcher, int rank) {
  if (under_launcher) {
    if (rank != 0) std::this_thread::sleep_for(std::chrono::seconds(2));
    AbortAllRanks(std::string(s.message()));
  }
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

int RunCli(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintTopUsage();
    return argc < 2 ? 2 : 0;
  }
  const Command* cmd = nullptr;
  for (const Command& c : kCommands) {
    if (!std::strcmp(argv[1], c.name)) cmd = &c;
  }
  if (!cmd) {
    std::fprintf(stderr, "error: unknown command \"%s\"\n\n", argv[1]);
    PrintTopUsage();
    return 2;
  }
  std::vector<std::string> args = {std::string("eellm ") + cmd->name};
  int first = 2;
  if ((!std::strcmp(cmd->name, "convert") || !std::strcmp(cmd->name, "bench")) && argc > 2 &&
      argv[2][0] != '-') {
    // `eellm convert <mode> ...`, `eellm bench <what> ...`
    args.push_back(std::string(cmd->name[0] == 'c' ? "--mode=" : "--what=") + argv[2]);
    first = 3;
  }
  for (int i = first; i < argc; ++i) {
    std::string a = NormalizeFlag(argv[i]);
    if (a == "--help" || a == "-h" || a == "--helpfull") {
      PrintCommandUsage(*cmd);
      return 0;
    }
    args.push_back(a);
  }
  for (size_t i = 1; i < args.size(); ++i) {
    const absl::CommandLineFlag* flag = NamedFlag(args[i]);
    if (flag == nullptr) continue;
    if (!CommandHasFlag(*cmd, *flag)) {
      std::fprintf(stderr,
                   "error: --%s is not a flag of `eellm %s` (`eellm %s --help` lists them)\n",
                   std::string(flag->Name()).c_str(), cmd->name, cmd->name);
      return 2;
    }
    GivenFlags().insert(std::string(flag->Name()));
  }
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  absl::SetProgramUsageMessage(absl::StrCat("eellm ", cmd->name, ": ", cmd->summary));
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(cargv.size()), cargv.data());
  if (rest.size() > 1) {
    std::fprintf(stderr, "error: unexpected argument \"%s\" (flags are --name=value)\n", rest[1]);
    return 2;
  }
  return cmd->run();
}

}  // namespace eellm
