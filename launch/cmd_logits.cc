// `eellm logits`: prints one head's logits for a token sequence as JSON, for checking a
// converted model against another implementation (tools/hf_check.py compares with transformers).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/exit_surgery.h"
#include "launch/model_loader.h"
#include "launch/shared_flags.h"

ABSL_FLAG(std::string, tokens, "", "comma-separated token ids, e.g. 1,2,3 (required)");

namespace eellm {

int RunLogitsCommand() {
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    return 1;
  };
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) {
      return fail(absl::StrCat("--tokens: '", part, "' is not a token id"));
    }
    ids.push_back(id);
  }
  if (absl::GetFlag(FLAGS_checkpoint).empty()) return fail("--checkpoint is required");
  auto backend = MakeBackend(absl::GetFlag(FLAGS_backend));
  if (!backend.ok()) return fail(std::string(backend.status().message()));
  auto loaded = LoadModelFromCheckpoint(absl::GetFlag(FLAGS_checkpoint), backend->get());
  if (!loaded.ok()) return fail(std::string(loaded.status().message()));
  auto logits = HeadLogits(*loaded->model, ids, absl::GetFlag(FLAGS_exit));
  if (!logits.ok()) return fail(std::string(logits.status().message()));
  const size_t vocab = static_cast<size_t>(loaded->config.vocab_size);
  std::string out = "{\"logits\": [";
  for (size_t t = 0; t < ids.size(); ++t) {
    absl::StrAppend(&out, t ? ", [" : "[");
    for (size_t v = 0; v < vocab; ++v) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%s%.9g", v ? ", " : "", (*logits)[t * vocab + v]);
      out += buf;
    }
    out += "]";
  }
  out += "]}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace eellm
