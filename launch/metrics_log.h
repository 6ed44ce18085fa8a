// A run's progress as JSON lines (<out>/metrics.jsonl, continued across resumes), for plots and
// tools instead of parsing the console: one line per logged training step and per validation.
//   {"step": 20, "loss": {"final": 2.31, "exit@2": 2.9}, "lr": 0.003, "grad_norm": 0.8,
//    "tokens_per_s": 8800}
//   {"step": 200, "val_loss": {"final": 2.1, "exit@2": 2.6}}
// A head whose loss was not computed (EE-Tuning that stops at its deepest exit) is left out.
// With a TensorBoard event file (train.tensorboard_dir) the same values go there too, as
// scalars tagged loss/final, loss/exit@2, ..., val_loss/..., lr, grad_norm, tokens_per_s.
#pragma once

#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/tensorboard_events.h"
#include "models/model_config.h"

namespace eellm {

class MetricsLog {
 public:
  MetricsLog() = default;  // logs nothing
  // Continues `path` (creating its directory) after its lines of steps before `first_step`: a
  // run starting at step 0 starts it afresh, a resumed one drops what followed its checkpoint.
  static absl::StatusOr<MetricsLog> Open(const std::string& path, int first_step);
  // Also (or only, on a default-constructed log) writes these TensorBoard events.
  void set_tensorboard(TensorBoardEvents events) { tensorboard_ = std::move(events); }

  void Train(int step, const ModelConfig& c, double final_loss, bool final_computed,
             const std::vector<double>& exit_losses, double lr, double grad_norm,
             double tokens_per_s);
  void Eval(int step, const ModelConfig& c, double final_loss, bool final_computed,
            const std::vector<double>& exit_losses);

 private:
  std::shared_ptr<std::FILE> file_;
  TensorBoardEvents tensorboard_;
};

// A run's log: the JSON lines at `path` ("" = none) and TensorBoard events in `tensorboard_dir`
// ("" = none). A file that cannot be written costs its metrics (a warning), not the run.
// `verbose`: says where the events go.
MetricsLog OpenRunMetrics(const std::string& path, const std::string& tensorboard_dir,
                          int first_step, bool verbose);

}  // namespace eellm
