#include "launch/inference_group.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/core/logging.h"
#include "engine/core/status.h"
#include "launch/commands.h"
#include "parallel/comm/mpi_communicator.h"

namespace eellm {

int InferenceGroup::Fail(const absl::Status& s) const { return FailCommand(s, multi, launch.rank); }

absl::Status InferenceGroup::QuietOtherRanks() const {
  if (multi && launch.rank != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) {
    return absl::InternalError("cannot silence stdout");
  }
  return absl::OkStatus();
}

absl::Status StartInferenceGroup(InferenceGroup* g, int tp_flag, int pp_flag, const char* what) {
  ASSIGN_OR_RETURN(g->launch, DetectLaunch());
  g->multi = g->launch.world > 1;
  if (g->multi) {
    g->mpi = std::make_unique<MpiRuntime>();
    SetLogRank(g->launch.rank);
  }
  if (tp_flag < 0 || pp_flag < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp and --pp must be >= 0, got ", tp_flag, " and ", pp_flag));
  }
  g->pp = pp_flag > 0 ? pp_flag : 1;
  g->tp = tp_flag > 0 ? tp_flag : std::max(1, g->launch.world / g->pp);
  if (static_cast<int64_t>(g->tp) * g->pp != g->launch.world) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp ", g->tp, " x --pp ", g->pp, " must equal the number of processes (",
                     g->launch.world, "): ", what, " runs one tensor-parallel group per stage"));
  }
  g->stage = g->launch.rank / g->tp;
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
    g->messages = MpiCommunicator::World(nullptr);
    Communicator* group = g->world.get();
    if (g->pp > 1) {
      ASSIGN_OR_RETURN(RankGrid grid, RankGrid::Create(g->tp, g->pp, 1, g->launch.world));
      g->stage_group = g->world->Subgroup(grid.TpGroup(g->launch.rank));
      group = g->stage_group.get();
    }
    tp = TpSpec{group->rank(), group->size(), group};
  }
  ASSIGN_OR_RETURN(g->loaded, LoadModelFromCheckpoint(checkpoint, g->backend.get(), false, tp,
                                                      StageSpec{g->stage, g->pp}));
  const auto& attrs = g->loaded.meta.attrs;
  ASSIGN_OR_RETURN(g->tokenizer,
                   MakeTokenizer(attrs.count("tokenizer") ? attrs.at("tokenizer") : "byte"));
  const int vocab = g->loaded.model->config().vocab_size;
  g->token_limit = attrs.count("tokenizer") ? std::min(vocab, g->tokenizer->vocab_size()) : vocab;
  return absl::OkStatus();
}

}  // namespace eellm
