// The training-step benchmark behind `eellm bench train` (see bench_train.cc for the FLOP
// formula): throughput, model FLOP/s against the backend's GEMM ceiling and the GPU peak, peak
// memory, per-op breakdown, exits' time share, and a PyTorch reference in the same command.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "models/model_config.h"

namespace eellm {

struct TrainBenchOptions {
  int batch = 8, seq = 256, micro_batch = 0;  // micro_batch 0 = batch
  int steps = 5, warmup = 2;
  uint64_t seed = 1234;
  bool compare_without_exits = true;
  std::string model_path;       // passed to the PyTorch reference
  std::string torch_reference;  // script path; "" = no reference run
  std::string python = "python3";
};

struct TrainBenchResult {
  double step_seconds = 0, tokens_per_second = 0, flops_per_token = 0, flops_per_second = 0;
  double profiled_step_seconds = 0;
  int64_t params = 0;
  size_t peak_bytes = 0;
  // Calls per step that made the host wait for the device (ProfilingBackend::host_waits).
  double host_waits_per_step = 0;
  // Device memory the benchmark took: free memory before the model was built minus the lowest
  // after a step (scratch and library workspaces included, e.g. cuDNN's); -1 where the backend
  // cannot say (CPU).
  int64_t device_bytes = -1;
  struct Op {
    std::string name;
    double seconds;
    int64_t calls;
    double flops;  // of its matrix products (ProfilingBackend::OpStats)
    double bytes;  // its least memory traffic
  };
  std::vector<Op> ops;          // slowest first
  std::vector<Op> gemm_shapes;  // the GEMM ops by shape (ProfilingBackend::gemm_shapes), slowest
                                // first
};

absl::StatusOr<TrainBenchResult> BenchTrainStep(const ModelConfig& mc, Backend* backend,
                                                const TrainBenchOptions& o);
// Runs the benchmark and prints its report.
absl::Status RunTrainBenchmark(const ModelConfig& mc, Backend* backend, const TrainBenchOptions& o);

}  // namespace eellm
