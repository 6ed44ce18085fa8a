// The `eellm` subcommands (data, train, generate, serve, convert, logits, bench) behind one
// dispatcher, with per-subcommand
// --help and flag names accepted with dashes or underscores (--max-new-tokens = --max_new_tokens).
#pragma once

namespace eellm {

// Runs `eellm <subcommand> [flags]`; returns the process exit code.
int RunCli(int argc, char** argv);

// Subcommands: argv[0] is "eellm <name>"; flags are already parsed.
int RunDataCommand();
int RunTrainCommand();
int RunGenerateCommand();
int RunServeCommand();
int RunConvertCommand();
int RunLogitsCommand();
int RunBenchCommand();

}  // namespace eellm
