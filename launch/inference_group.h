// What `eellm generate` and `eellm serve` start with: one process, or the ranks of mpirun/Slurm
// forming a pipeline of tensor-parallel groups (world rank = stage * tp + tensor-parallel rank);
// MPI; the backend on this rank's GPU; and this rank's shard of a checkpoint (of any layout)
// with its tokenizer.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "launch/model_loader.h"
#include "models/tokenizer.h"
#include "parallel/comm/communicator.h"
#include "parallel/comm/mpi_runtime.h"
#include "parallel/topology.h"

namespace eellm {

struct InferenceGroup {
  LaunchInfo launch;
  bool multi = false;               // under a launcher, with more than one process
  std::unique_ptr<MpiRuntime> mpi;  // multi only
  std::unique_ptr<Backend> backend;
  int tp = 1, pp = 1, stage = 0;
  std::unique_ptr<Communicator> world;        // every rank, on the backend's memory (multi only)
  std::unique_ptr<Communicator> stage_group;  // this stage's tensor-parallel group (pp > 1)
  std::unique_ptr<Communicator> messages;     // every rank, host memory (multi only)
  LoadedModel loaded;
  std::unique_ptr<Tokenizer> tokenizer;
  // Ids generation may produce (Generator::set_token_limit): the named tokenizer's, where the
  // model's vocabulary is padded past it; else the model's vocabulary.
  int token_limit = 0;

  // Reports an error so that no rank hangs (FailCommand); returns the exit code.
  int Fail(const absl::Status& s) const;
  // Under a launcher, sends the standard output of every rank but 0 to /dev/null (rank 0 prints).
  absl::Status QuietOtherRanks() const;
};

// Reads the launcher and starts MPI under one. `pp_flag` (0: 1) times `tp_flag` (0: the
// processes over pp) must equal the number of processes; `what` names the command in that error
// ("generation").
absl::Status StartInferenceGroup(InferenceGroup* g, int tp_flag, int pp_flag, const char* what);

// Makes `backend` (cuda ones on GPU local_rank), the group's communicator, and loads this
// rank's shard of `checkpoint` and the tokenizer it names.
absl::Status LoadInferenceModel(InferenceGroup* g, const std::string& checkpoint,
                                const std::string& backend);

}  // namespace eellm
