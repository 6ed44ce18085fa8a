// A run's progress as JSON lines (<out>/metrics.jsonl, continued across resumes), for plots and
// tools instead of parsing the console: one line per logged training step and per validation.
//   {"step": 20, "loss": {"final": 2.31, "exit@2": 2.9}, "lr": 0.003, "grad_norm": 0.8,
//    "tokens_per_s": 8800}
//   {"step": 200, "val_loss": {"final": 2.1, "exit@2": 2.6}}
// A head whose loss was not computed (EE-Tuning that stops at its deepest exit) is left out.
#pragma once

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "models/model_config.h"

namespace eellm {

class MetricsLog {
 public:
  MetricsLog() = default;  // logs nothing
  // Continues `path` (creating its directory) after its lines of steps before `first_step`: a
  // run starting at step 0 starts it afresh, a resumed one drops what followed its checkpoint.
  static absl::StatusOr<MetricsLog> Open(const std::string& path, int first_step);

  void Train(int step, const ModelConfig& c, double final_loss, bool final_computed,
             const std::vector<double>& exit_losses, double lr, double grad_norm,
             double tokens_per_s);
  void Eval(int step, const ModelConfig& c, double final_loss, bool final_computed,
            const std::vector<double>& exit_losses);

 private:
  std::shared_ptr<std::FILE> file_;
};

}  // namespace eellm
