// Exit surgery on whole-model tensors (EE-Tuning step 1, see shared/EE-LLM.md): adding exits to a
// (pretrained) model with their initial weights, and moving exits between the post-layer L and
// pre-layer L+1 positions. Also moves tensors between a Model's ParamStore and a HostTensorMap
// and computes one head's logits, for the converters, their checks and `eellm logits`.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "checkpoints/host_tensor.h"
#include "engine/tensor/param_store.h"
#include "models/model_config.h"
#include "models/transformer.h"

namespace eellm {

// How AddExits initialises a new exit. Every "copy" variant gives the exit's norm (kinds norm,
// mlp, block) the final norm's weights and its untied head the final output weight (the word
// embedding when the model ties it); tied exit heads are the word embedding in any case.
enum class ExitInit {
  kRandom,     // "random": weights N(0, 0.02), norm gains 1, biases 0
  kCopyFinal,  // "copy-final": norm and head from the final head; MLP / block parts random
  kCopyMlp,    // "copy-mlp" (mlp exits only): + the MLP (mlp_norm and mlp.*) of the exit's layer
  kCopyBlock,  // "copy-block" (block exits only): + the last transformer layer as the block
};

// "random", "copy-final", "copy-mlp", "copy-block" ('_' may replace '-').
absl::StatusOr<ExitInit> ParseExitInit(absl::string_view name);
const char* ExitInitName(ExitInit init);

// Adds `new_exits` to `c` and creates their tensors in `tensors`, which must hold exactly the
// whole model for `c` (see EellmParamShapes). Exits are numbered in depth order (ModelConfig
// keeps them sorted), so existing exits may get new numbers: their "exits.{k}." tensors are
// renamed to match. Random values depend only on `seed` and the tensor's name.
// Errors (nothing is changed then): a layer out of range (post: 1 .. num_layers - 1, pre:
// 1 .. num_layers), a new exit reading the same hidden state as another exit (same layer and
// position, or post L and pre L + 1), an init that does not fit the kind (copy-mlp needs mlp
// exits, copy-block block exits), tensors that do not match `c`.
absl::Status AddExits(ModelConfig& c, HostTensorMap& tensors,
                      const std::vector<ExitConfig>& new_exits, ExitInit init, uint64_t seed);

// Moves exit `exit_index` to `position` at the same depth: post-layer L <-> pre-layer L + 1
// (both read the output of layer L), so its tensors and number are unchanged and only the
// config changes; a no-op when it is already there. Errors: index out of range; a pre-layer exit
// at layer 1 (it reads the embeddings: there is no post-layer 0); an MLP-branch exit, whose post
// form reads layer L's attention output rather than the layer's output, so moving it would
// change what it computes.
absl::Status SetExitPosition(ModelConfig& c, int exit_index, ExitPosition position);

// A whole model's parameters (tp = 1, one pipeline stage) as host tensors by name.
HostTensorMap ParamsToHost(const ParamStore& ps);
// Loads `t` into `ps`: every parameter must be present with its shape and every tensor must be a
// parameter (errors name the tensor). Nothing is written unless all match.
absl::Status HostToParams(const HostTensorMap& t, ParamStore& ps);

// Logits [ids.size() * vocab] of one head over one sequence at positions 0, 1, ...: the final
// head for exit_index < 0, else exit `exit_index`. `m` must be a whole model (one stage, tp 1).
absl::StatusOr<std::vector<float>> HeadLogits(Model& m, absl::Span<const int32_t> ids,
                                              int exit_index);

}  // namespace eellm
