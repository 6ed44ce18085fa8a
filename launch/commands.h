// The `eellm` subcommands (data, train, generate, serve, convert, logits, bench) behind one
// dispatcher, with per-subcommand
// --help and flag names accepted with dashes or underscores (--max-new-tokens = --max_new_tokens).
#pragma once

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace eellm {

// Runs `eellm <subcommand> [flags]`; returns the process exit code. A flag of another
// subcommand (e.g. `eellm train --batch=3`) is an error naming it, not silently ignored.
int RunCli(int argc, char** argv);

// Whether the command line named the flag (e.g. "backend"), so that a subcommand can tell a flag
// given at its default value from one not given (which leaves the config's value).
bool FlagOnCommandLine(absl::string_view name);

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
