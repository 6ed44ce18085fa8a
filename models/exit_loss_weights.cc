#include "models/exit_loss_weights.h"

#include "absl/strings/str_cat.h"
#include "engine/optim/schedules.h"

namespace eellm {

std::vector<float> ExitLossWeights(const ModelConfig& c, int step) {
  std::vector<float> w;
  for (const ExitConfig& x : c.exits) {
    w.push_back(
        static_cast<float>(Ramp(step, x.loss_weight_warmup_iters, x.loss_weight_init, x.loss_weight,
                                x.loss_weight_warmup == WarmupStyle::kCosine)));
  }
  return w;
}

std::string ExitName(const ModelConfig& c, int i) {
  if (i < 0) return absl::StrCat("final@", c.num_layers);
  const ExitConfig& x = c.exits[i];
  return absl::StrCat("exit@", x.layer, x.position == ExitPosition::kPre ? "pre" : "");
}

}  // namespace eellm
