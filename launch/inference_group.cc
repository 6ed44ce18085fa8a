#include "launch/inference_group.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/core/logging.h"
#include "engine/core/status.h"
#include "launch/commands.h"
#include "parallel/comm/mpi_communicator.h"

namespace eellm {

int InferenceGroup::Fail(const absl::Status& s) const { return FailCommand(s, multi, launch.rank); }

absl::Status StartInferenceGroup(InferenceGroup* g, int tp_flag, const char* what) {
  ASSIGN_OR_RETURN(g->launch, DetectLaunch());
  g->multi = g->launch.world > 1;
  if (g->multi) {
    g->mpi = std::make_unique<MpiRuntime>();
    SetLogRank(g->launch.rank);
  }
  const int tp = tp_flag > 0 ? tp_flag : g->launch.world;
  if (tp != g->launch.world) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp ", tp, " must equal the number of processes (", g->launch.world,
                     "): ", what, " runs one tensor-parallel group"));
  }
  return absl::OkStatus();
}

absl::Status LoadInferenceModel(InferenceGroup* g, const std::string& checkpoint,
                                const std::string& backend) {
  std::string device = backend;
  if (g->multi && absl::StartsWith(device, "cuda") && device.find(':') == std::string::npos) {
    device = absl::StrCat(device, ":", g->launch.local_rank);  // each rank of a node: its GPU
  }
  ASSIGN_OR_RETURN(g->backend, MakeBackend(device));
  TpSpec tp;
  if (g->multi) {
    g->world = MpiCommunicator::World(g->backend.get());
    tp = TpSpec{g->world->rank(), g->world->size(), g->world.get()};
  }
  ASSIGN_OR_RETURN(g->loaded, LoadModelFromCheckpoint(checkpoint, g->backend.get(), false, tp));
  const auto& attrs = g->loaded.meta.attrs;
  ASSIGN_OR_RETURN(g->tokenizer,
                   MakeTokenizer(attrs.count("tokenizer") ? attrs.at("tokenizer") : "byte"));
  return absl::OkStatus();
}

}  // namespace eellm
