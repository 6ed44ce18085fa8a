#include "launch/tuning_setup.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cpu/cpu_backend.h"
#include "launch/context_length.h"
#include "models/transformer.h"
#include "parallel/comm/host_values.h"
#include "parallel/topology.h"

namespace eellm {

void PrintFrozenBackbone(const ModelConfig& mc, const TrainConfig& tc, double trainable,
                         int64_t gradient_elements, double padded, int cut,
                         const std::string& rest_source) {
  std::printf(
      "frozen backbone (EE-Tuning): training the exits' %.3f M parameters%s, "
      "forward only through the rest; gradients and moments for %.3f M of this rank's "
      "%.3f M arena elements",
      trainable / 1e6, tc.tp > 1 ? " (tensor-parallel rank 0's shards)" : "",
      gradient_elements / 1e6, padded / 1e6);
  const int depth = Model::DeepestExitDepth(mc);
  if (cut > 0) {
    std::printf(
        ", up to layer %d of %d (the deepest exit): layers %d-%d and the final head are "
        "neither built nor loaded (saves copy them from %s), validation reports the exits",
        depth, mc.num_layers, depth + 1, mc.num_layers, rest_source.c_str());
  } else if (depth < mc.num_layers) {
    std::printf(
        ", up to layer %d of %d (the deepest exit): the final head's training loss "
        "is not computed, validation runs every layer (--skip-layers-past-exits: "
        "neither build nor load the rest)",
        depth, mc.num_layers);
  }
  std::printf("\n");
  // Stages after the last one holding an exit have no work in a tuning step.
  const int last = Model::LastStageWithExit(mc, tc.pp, cut);
  if (tc.virtual_stages <= 1 && last + 1 < tc.pp) {
    const std::string which = last + 2 == tc.pp
                                  ? absl::StrCat("stage ", last + 1, " holds")
                                  : absl::StrCat("stages ", last + 1, "-", tc.pp - 1, " hold");
    std::printf("note: pipeline %s no exit: idle in tuning steps (used in validation)\n",
                which.c_str());
  }
}

absl::Status ValidateTuneCache(const TrainConfig& t) {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (t.tune_cache_mb < 0)
    return bad("tune_cache_mb must be >= 0 (0 = off), got ", t.tune_cache_mb);
  if (t.tune_cache_mb == 0) return absl::OkStatus();
  if (!t.freeze_backbone) {
    return bad("tune_cache_mb ", t.tune_cache_mb,
               " caches a frozen backbone's hidden states: it needs freeze_backbone");
  }
  if (t.sampling != "epochs") {
    return bad("tune_cache_mb needs sampling \"epochs\" (windows that come back), got \"",
               t.sampling, "\"");
  }
  if (t.hidden_dropout != 0) {
    return bad("tune_cache_mb: with hidden_dropout ", t.hidden_dropout,
               " the backbone's hidden states differ at every pass; set one of them to 0");
  }
  if (t.sequence_parallel && t.tp > 1) {
    return bad("tune_cache_mb is not available with sequence_parallel");
  }
  if (t.dp > 1) {
    // Each data-parallel rank reads another share of the windows every epoch, so a rank would
    // rarely hold all of a step's windows (under 1% of steps with 64 rows per rank even after 5
    // epochs at dp 2).
    return bad("tune_cache_mb needs dp 1 (got dp ", t.dp,
               "): each data-parallel rank reads another share of the windows every epoch, so "
               "its steps' windows would rarely all have come before; EE-Tuning layouts use tp "
               "x pp");
  }
  return absl::OkStatus();
}

std::string SetUpTuneCache(PipelineExecutor& exec, const BlendedDataset& train,
                           const TrainConfig& tc, int start, int64_t start_samples,
                           ParallelContext& ctx, Backend* be) {
  if (tc.tune_cache_mb <= 0) return "";
  const int64_t windows = train.Windows(tc.seq_len);
  // This rank's need against the host memory left to each process on its machine.
  const size_t per_rank = exec.TuneCacheBytesPerWindow();
  const double mine = static_cast<double>(per_rank) * windows;
  const auto launch = DetectLaunch();
  const int64_t available = AvailablePerProcess(CpuBackend().AvailableMemoryBytes(), true,
                                                launch.ok() ? launch->local_size : 1);
  // Over every rank (stages hold different exits), so that all decide alike: the most any
  // keeps per window, and whether it would not fit some rank's share of host memory.
  std::vector<double> most = {static_cast<double>(per_rank),
                              available >= 0 && mine > 0.9 * available ? 1.0 : 0.0};
  SumOverGroup(ctx.world.get(), be, most, ReduceOp::kMax);
  const double per_window = most[0], need = per_window * static_cast<double>(windows);
  auto size = [](double bytes) {
    return bytes < 1048576.0 ? absl::StrFormat("%.1f KiB", bytes / 1024.0)
                             : absl::StrFormat("%.1f MiB", bytes / 1048576.0);
  };
  const std::string sizes = absl::StrFormat(
      "%lld training windows x %s = %s on the rank keeping most, of tune_cache_mb %d",
      static_cast<long long>(windows), size(per_window), size(need), tc.tune_cache_mb);
  if (need > tc.tune_cache_mb * 1048576.0) {
    return absl::StrCat("tune cache: off: ", sizes,
                        " (raise it to cache, or shorten seq_len / the data)");
  }
  if (most[1] > 0) {
    return absl::StrCat("tune cache: off: ", sizes,
                        ", more than 90% of the host memory free to a rank on some machine");
  }
  // The steps it would serve: those whose windows were all read by an earlier step of this run
  // (every epoch is a fresh order, so a run that starts mid-epoch waits for the one after).
  std::vector<bool> seen(windows, false);
  std::vector<int64_t> ids(tc.batch_size);
  int64_t served = 0;
  for (int step = start; step < tc.steps; ++step) {
    train.EpochWindowIds(tc.seed, start_samples + int64_t{step - start} * tc.batch_size,
                         tc.batch_size, tc.seq_len, ids.data());
    served += std::all_of(ids.begin(), ids.end(), [&](int64_t w) { return seen[w]; });
    for (int64_t w : ids) seen[w] = true;
  }
  const int steps = tc.steps - start;
  if (served * 10 < steps) {
    // Storing costs the first epoch some speed (12% on the demo model on 2 CPU cores).
    return absl::StrFormat(
        "tune cache: off: only %lld of the run's %d steps would run from it (a step's windows "
        "must all have come before; every epoch is a fresh order) (%s)",
        static_cast<long long>(served), steps, sizes);
  }
  exec.set_tune_cache(windows);
  return absl::StrFormat(
      "tune cache: %s; %lld of the run's %d steps will run from it, without the backbone", sizes,
      static_cast<long long>(served), steps);
}

}  // namespace eellm
