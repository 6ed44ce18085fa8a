// The `eellm` subcommands (data, train, generate, serve, convert, logits, bench) behind one
// dispatcher, with per-subcommand
// --help and flag names accepted with dashes or underscores (--max-new-tokens = --max_new_tokens).
#pragma once

#include "absl/status/status.h"

namespace eellm {

// Runs `eellm <subcommand> [flags]`; returns the process exit code.
int RunCli(int argc, char** argv);

// Reports a command's error: prints "error: <message>" and returns 1; under a launcher
// (mpirun, Slurm) ends every rank instead, so that none hangs in a collective, with the message
// printed once when every rank hits the same error (ranks other than 0 wait 2 s first).
int FailCommand(const absl::Status& s, bool under_launcher = false, int rank = 0);

// Subcommands: argv[0] is "eellm <name>"; flags are already parsed.
int RunDataCommand();
int RunTrainCommand();
int RunGenerateCommand();
int RunServeCommand();
int RunConvertCommand();
int RunLogitsCommand();
int RunBenchCommand();

}  // namespace eellm
