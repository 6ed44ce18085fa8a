// `eellm data`: text file -> <output>.train.bin and <output>.val.bin token files.
#include <cstdio>

#include "absl/flags/flag.h"
#include "launch/commands.h"
#include "models/token_file.h"
#include "models/tokenizer.h"

ABSL_FLAG(std::string, input, "", "text file to tokenize (required)");
ABSL_FLAG(std::string, output, "data/corpus",
          "output prefix: writes <output>.train.bin and .val.bin");
ABSL_FLAG(double, val_fraction, 0.01,
          "fraction of the tokens (the end of the text) kept for validation");
ABSL_FLAG(std::string, tokenizer, "byte", "tokenizer: byte");

namespace eellm {

int RunDataCommand() {
  if (absl::GetFlag(FLAGS_input).empty()) {
    std::fprintf(stderr, "error: --input is required (a text file)\n");
    return 2;
  }
  auto tok = MakeTokenizer(absl::GetFlag(FLAGS_tokenizer));
  if (!tok.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  auto r = PrepareTokenData(absl::GetFlag(FLAGS_input), **tok, absl::GetFlag(FLAGS_output),
                            absl::GetFlag(FLAGS_val_fraction));
  if (!r.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  std::printf(
      "wrote %s.train.bin (%lld tokens) and %s.val.bin (%lld tokens) with the %s tokenizer\n",
      absl::GetFlag(FLAGS_output).c_str(), static_cast<long long>(r->train_tokens),
      absl::GetFlag(FLAGS_output).c_str(), static_cast<long long>(r->val_tokens),
      (*tok)->name().c_str());
  return 0;
}

}  // namespace eellm
