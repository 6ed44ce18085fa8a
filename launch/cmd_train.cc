// `eellm train`: trains a model from a JSON run config ({"model": ..., "train": ...}).
#include <cstdio>

#include "absl/flags/flag.h"
#include "launch/commands.h"
#include "launch/trainer.h"

ABSL_FLAG(std::string, config, "",
          "JSON run config with \"model\" and \"train\" sections (required)");
ABSL_FLAG(int, steps, 0, "override train.steps (0 = keep)");
ABSL_FLAG(std::string, out, "", "override train.out, the checkpoint directory");
ABSL_FLAG(std::string, data, "", "override train.data, the token-file prefix");
ABSL_FLAG(std::string, resume, "", "checkpoint to resume from (model, optimizer state, step)");
ABSL_FLAG(bool, quiet, false, "print only errors");

namespace eellm {

int RunTrainCommand() {
  if (absl::GetFlag(FLAGS_config).empty()) {
    std::fprintf(stderr, "error: --config is required (see configs/ for examples)\n");
    return 2;
  }
  auto rc = LoadRunConfig(absl::GetFlag(FLAGS_config));
  if (!rc.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(rc.status().message()).c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_steps) > 0) rc->train.steps = absl::GetFlag(FLAGS_steps);
  if (!absl::GetFlag(FLAGS_out).empty()) rc->train.out = absl::GetFlag(FLAGS_out);
  if (!absl::GetFlag(FLAGS_data).empty()) rc->train.data = absl::GetFlag(FLAGS_data);
  TrainOptions opts;
  opts.resume = absl::GetFlag(FLAGS_resume);
  opts.verbose = !absl::GetFlag(FLAGS_quiet);
  auto s = RunTraining(*rc, opts);
  if (!s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.status().message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace eellm
