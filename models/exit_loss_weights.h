// Early-exit loss weights per training step: each exit's weight ramps from loss_weight_init to
// loss_weight over loss_weight_warmup_iters steps, linearly or along a half cosine (EE-LLM's
// --exit-layer-weight-init / --exit-layer-weight-warmup-iters / -style).
#pragma once

#include <string>
#include <vector>

#include "models/model_config.h"

namespace eellm {

std::vector<float> ExitLossWeights(const ModelConfig& c, int step);

// Short display name of exit i: "exit@6" (post) or "exit@7pre"; of the final head (i = -1):
// "final@<layers>".
std::string ExitName(const ModelConfig& c, int i);

}  // namespace eellm
