// `eellm data`: text file (or JSON lines) -> <output>.train.bin and <output>.val.bin token files.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "launch/commands.h"
#include "launch/shared_flags.h"
#include "models/token_file.h"
#include "models/tokenizer.h"

ABSL_FLAG(double, val_fraction, 0.01,
          "fraction of the tokens (the end of the text) kept for validation");
ABSL_FLAG(std::vector<std::string>, json_keys, {"text"},
          "for an --input ending in .jsonl (one JSON object per line, as Megatron's "
          "preprocess_data.py reads): the keys whose strings are documents, each followed by "
          "the end-of-text token");

namespace eellm {

int RunDataCommand() {
  if (absl::GetFlag(FLAGS_input).empty()) {
    std::fprintf(stderr, "error: --input is required (a text file, or JSON lines ending .jsonl)\n");
    return 2;
  }
  const std::string output =
      absl::GetFlag(FLAGS_output).empty() ? "data/corpus" : absl::GetFlag(FLAGS_output);
  const std::string spec = absl::GetFlag(FLAGS_tokenizer);
  auto tok = MakeTokenizer(spec.empty() ? "byte" : spec);
  if (!tok.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  auto r = PrepareTokenData(absl::GetFlag(FLAGS_input), **tok, output,
                            absl::GetFlag(FLAGS_val_fraction), absl::GetFlag(FLAGS_json_keys));
  if (!r.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  std::printf(
      "wrote %s.train.bin (%lld tokens) and %s.val.bin (%lld tokens) with the %s tokenizer\n",
      output.c_str(), static_cast<long long>(r->train_tokens), output.c_str(),
      static_cast<long long>(r->val_tokens), (*tok)->name().c_str());
  return 0;
}

}  // namespace eellm
