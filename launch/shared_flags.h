// Flags that several `eellm` subcommands share (absl flags are global, so each is defined once
// here); each command's --help lists the shared flags it uses beside its own.
#pragma once

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(std::string, input);
ABSL_DECLARE_FLAG(std::string, output);
ABSL_DECLARE_FLAG(int, tp);
ABSL_DECLARE_FLAG(int, pp);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, checkpoint);
ABSL_DECLARE_FLAG(std::string, backend);
ABSL_DECLARE_FLAG(int, exit);
ABSL_DECLARE_FLAG(int, steps);
ABSL_DECLARE_FLAG(double, temperature);
ABSL_DECLARE_FLAG(int, max_model_len);
ABSL_DECLARE_FLAG(int, draft_tokens);
ABSL_DECLARE_FLAG(double, draft_confidence);
ABSL_DECLARE_FLAG(std::string, tokenizer);
