// `eellm train`: trains a model from a JSON run config ({"model": ..., "train": ...}), on one
// process or on every rank of an mpirun / srun job (--tp, --pp, --dp).
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "engine/core/logging.h"
#include "launch/commands.h"
#include "launch/shared_flags.h"
#include "launch/trainer.h"
#include "parallel/comm/mpi_communicator.h"
#ifdef EELLM_HAVE_NCCL
#include "parallel/comm/nccl_communicator.h"
#ifdef EELLM_HAVE_CUDA
#include "engine/cuda/make_cuda_backend.h"
#endif
#endif
#include "parallel/comm/mpi_runtime.h"
#include "parallel/topology.h"

ABSL_FLAG(std::string, config, "",
          "JSON run config with \"model\" and \"train\" sections (required)");
ABSL_FLAG(std::string, out, "", "override train.out, the checkpoint directory");
ABSL_FLAG(std::string, data, "",
          "override train.data: the prefix of eellm data's token files or of a Megatron dataset "
          "(.bin/.idx), or a blend of them (\"0.3 /data/a 0.7 /data/b\")");
ABSL_FLAG(std::string, resume, "",
          "checkpoint to resume from (model, optimizer state, step): a run directory (its "
          "latest step), a step directory or a checkpoint file; any parallel layout");
ABSL_FLAG(std::string, init_from, "",
          "checkpoint whose weights start the run, with a fresh optimizer at step 0 (e.g. from "
          "`eellm convert`); its model config must equal the run config's");
ABSL_FLAG(bool, quiet, false, "print only errors");
ABSL_FLAG(int, dp, 0, "data-parallel size (0 = train.dp, or world / (tp * pp) under a launcher)");
ABSL_FLAG(bool, timeline, false,
          "print the pipeline timeline of the last step (measured and cost model)");
ABSL_FLAG(std::string, tensorboard_dir, "",
          "override train.tensorboard_dir: also write the logged values as TensorBoard scalars "
          "in an event file there");
ABSL_FLAG(double, hidden_dropout, -1,
          "override train.hidden_dropout: drop attention and MLP outputs and the embedding with "
          "this probability in training (Megatron's --hidden-dropout)");
ABSL_FLAG(std::string, sampling, "",
          "override train.sampling: epochs (each window once per epoch, as Megatron) or random "
          "(random offsets, with replacement)");
ABSL_FLAG(std::string, exit_placement, "",
          "override train.exit_placement: bubbles (exit work in pipeline bubbles) or backward");
ABSL_FLAG(int, virtual_stages, 0,
          "model chunks per pipeline rank for interleaved 1F1B (0 = train.virtual_stages)");
ABSL_FLAG(bool, zero1, false, "shard the optimizer state over data-parallel ranks (ZeRO-1)");
ABSL_FLAG(bool, freeze_backbone, false,
          "EE-Tuning: train only the exits' own parameters, the backbone frozen (forward only)");
ABSL_FLAG(bool, sequence_parallel, false,
          "with --tp > 1: each tensor-parallel rank holds 1/tp of the rows between the branches "
          "(Megatron's --sequence-parallel)");
ABSL_FLAG(bool, eod_mask_loss, false,
          "no loss at positions whose input token is the end-of-text (Megatron's --eod-mask-loss)");
ABSL_FLAG(bool, skip_layers_past_exits, false,
          "EE-Tuning (with --freeze-backbone and --init-from or --resume): build and load no layer "
          "past the deepest exit, nor the final head; the pipeline stages split the layers up to "
          "it, and saves copy the rest from the checkpoint the run started from");
ABSL_FLAG(int32_t, tune_cache_mb, -1,
          "EE-Tuning (with --freeze-backbone): MiB of host memory per rank for the backbone's "
          "hidden states of every training window, read back after the first epoch instead of "
          "recomputed (0 = off; default: the config's train.tune_cache_mb)");

namespace eellm {
namespace {

#ifdef EELLM_HAVE_NCCL
// Whether two ranks of `world` run on the same GPU: each names its GPU by host name and PCI bus
// id (`bus_id`, which CUDA_VISIBLE_DEVICES cannot renumber), hashed (FNV-1a, 32 bits) into two
// exactly representable floats; every rank gathers all and gets the same answer. A hash
// collision errs towards "shared" (MPI instead of NCCL), never the other way.
bool RanksShareAGpu(Communicator* world, const std::string& bus_id) {
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  uint32_t h = 2166136261u;
  for (char ch : std::string(host) + "/" + bus_id) {
    h = (h ^ static_cast<unsigned char>(ch)) * 16777619u;
  }
  const float mine[2] = {static_cast<float>(h & 0xffffu), static_cast<float>(h >> 16)};
  std::vector<float> all(2 * static_cast<size_t>(world->size()));
  world->AllGather(mine, all.data(), 2);
  std::set<std::pair<float, float>> seen;
  for (size_t r = 0; r < all.size(); r += 2) {
    if (!seen.insert({all[r], all[r + 1]}).second) return true;
  }
  return false;
}
#endif

}  // namespace

int RunTrainCommand() {
  auto launch = DetectLaunch();
  if (!launch.ok()) return FailCommand(launch.status(), false);
  const bool multi = launch->world > 1;
  std::unique_ptr<MpiRuntime> mpi;
  if (multi) {
    mpi = std::make_unique<MpiRuntime>();
    SetLogRank(launch->rank);
  }
  if (absl::GetFlag(FLAGS_config).empty()) {
    return FailCommand(
        absl::InvalidArgumentError("--config is required (see configs/ for examples)"), multi,
        launch->rank);
  }
  auto rc = LoadRunConfig(absl::GetFlag(FLAGS_config));
  if (!rc.ok()) return FailCommand(rc.status(), multi, launch->rank);
  TrainConfig& t = rc->train;
  if (FlagOnCommandLine("backend")) t.backend = absl::GetFlag(FLAGS_backend);
  if (absl::GetFlag(FLAGS_steps) > 0) t.steps = absl::GetFlag(FLAGS_steps);
  if (!absl::GetFlag(FLAGS_out).empty()) t.out = absl::GetFlag(FLAGS_out);
  if (!absl::GetFlag(FLAGS_data).empty()) t.data = absl::GetFlag(FLAGS_data);
  if (absl::GetFlag(FLAGS_tp) > 0) t.tp = absl::GetFlag(FLAGS_tp);
  if (absl::GetFlag(FLAGS_pp) > 0) t.pp = absl::GetFlag(FLAGS_pp);
  if (absl::GetFlag(FLAGS_dp) > 0) {
    t.dp = absl::GetFlag(FLAGS_dp);
  } else if (multi && launch->world % (t.tp * t.pp) == 0) {
    t.dp = launch->world / (t.tp * t.pp);
  }
  if (absl::GetFlag(FLAGS_zero1)) t.zero1 = true;
  if (absl::GetFlag(FLAGS_freeze_backbone)) t.freeze_backbone = true;
  if (absl::GetFlag(FLAGS_skip_layers_past_exits)) t.skip_layers_past_exits = true;
  if (absl::GetFlag(FLAGS_tune_cache_mb) != -1)
    t.tune_cache_mb = absl::GetFlag(FLAGS_tune_cache_mb);
  if (absl::GetFlag(FLAGS_eod_mask_loss)) t.eod_mask_loss = true;
  if (absl::GetFlag(FLAGS_sequence_parallel)) t.sequence_parallel = true;
  if (absl::GetFlag(FLAGS_virtual_stages) > 0) {
    t.virtual_stages = absl::GetFlag(FLAGS_virtual_stages);
  }
  if (!absl::GetFlag(FLAGS_exit_placement).empty()) {
    t.exit_placement = absl::GetFlag(FLAGS_exit_placement);
  }
  if (!absl::GetFlag(FLAGS_sampling).empty()) t.sampling = absl::GetFlag(FLAGS_sampling);
  if (absl::GetFlag(FLAGS_hidden_dropout) != -1) {  // -1: not given; others are checked
    t.hidden_dropout = static_cast<float>(absl::GetFlag(FLAGS_hidden_dropout));
  }
  if (!absl::GetFlag(FLAGS_tensorboard_dir).empty()) {
    t.tensorboard_dir = absl::GetFlag(FLAGS_tensorboard_dir);
  }

  // Each rank of a node takes GPU local_rank (modulo the GPUs present).
  const bool cuda_without_device =
      t.backend == "cuda" || t.backend == "cuda-bf16" || t.backend == "cuda-bf16w";
  const std::string device =
      cuda_without_device ? absl::StrCat(t.backend, ":", launch->local_rank) : t.backend;
  auto backend = MakeBackend(device);
  if (!backend.ok()) return FailCommand(backend.status(), multi, launch->rank);
  TrainOptions opts;
  opts.resume = absl::GetFlag(FLAGS_resume);
  opts.init_from = absl::GetFlag(FLAGS_init_from);
  opts.verbose = !absl::GetFlag(FLAGS_quiet);
  opts.backend = backend->get();
  opts.print_timeline = absl::GetFlag(FLAGS_timeline);
  std::unique_ptr<ParallelContext> ctx;
  if (multi) {
    auto c = ParallelContext::Create(MpiCommunicator::World(backend->get()), t.tp, t.pp, t.dp);
    if (!c.ok()) return FailCommand(c.status(), multi, launch->rank);
    ctx = std::move(*c);
    const bool gpu = (*backend)->device() != Device::kCpu;
#ifdef EELLM_HAVE_NCCL
    // NCCL refuses two ranks of one communicator on the same GPU (more ranks on a node than
    // GPUs: each rank takes GPU local_rank modulo the count); "auto" then stays on MPI.
    const bool shared_gpu = gpu && RanksShareAGpu(MpiCommunicator::World(nullptr).get(),
                                                  CudaDeviceBusId(launch->local_rank));
    if (t.communicator == "nccl" && shared_gpu) {
      const std::string why = absl::StrCat(
          "communicator \"nccl\": two ranks on one node share a GPU (this rank: local rank ",
          launch->local_rank, ", ", CudaDeviceCount(), " GPUs visible); NCCL needs one GPU per ",
          "rank; use \"communicator\": \"mpi\" or fewer ranks per node");
      return FailCommand(absl::InvalidArgumentError(why), multi, launch->rank);
    }
    if (t.communicator == "nccl" || (t.communicator == "auto" && gpu && !shared_gpu)) {
      if (!gpu) {
        return FailCommand(absl::InvalidArgumentError(
                               "communicator \"nccl\" needs a GPU backend, not " + t.backend),
                           multi, launch->rank);
      }
      UseNcclForModelParallel(ctx.get(), MpiCommunicator::World(nullptr).get());
    }
#else
    if (t.communicator == "nccl") {
      return FailCommand(
          absl::UnimplementedError("communicator \"nccl\": this eellm was built without NCCL"),
          multi, launch->rank);
    }
    (void)gpu;
#endif
  } else {
    ctx = ParallelContext::Single();
  }
  opts.ctx = ctx.get();
  auto s = RunTraining(*rc, opts);
  if (!s.ok()) return FailCommand(s.status(), multi, launch->rank);
  return 0;
}

}  // namespace eellm
