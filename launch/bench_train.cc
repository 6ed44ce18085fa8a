// `eellm bench train`: training-step throughput of one model on one device, through the same
// code path as `eellm train` (Model, PipelineExecutor, DistributedOptimizer on a Backend):
// tokens/s, model TFLOP/s, MFU, peak memory, a per-op time breakdown, the exits' share of time
// against their share of FLOPs, and optionally a PyTorch reference run in the same command.
//
// Model FLOPs per token (PaLM, appendix B; Megatron counts the same way):
//   6 * N_matmul + 12 * L_attn * (heads * head_dim) * seq
// N_matmul: every matrix multiplied per token (all 2-D weights except the embedding tables,
// plus vocab * hidden for each head that projects with the tied embedding), exit heads
// included; L_attn: attention layers, block exits included; the T x T attention is counted
// whole, as Megatron does, although the causal half is skipped by fused kernels.
#include "launch/bench_train.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"
#include "engine/profiling_backend.h"
#include "launch/bench_limits.h"
#include "models/exit_loss_weights.h"
#include "models/pipeline_executor.h"
#include "models/transformer.h"
#include "nlohmann/json.hpp"
#include "parallel/distributed_optimizer.h"

#ifdef EELLM_HAVE_CUDA
#include "engine/cuda/make_cuda_backend.h"
#endif

namespace eellm {
namespace {

double FlopsPerToken(Model& m, int seq) {
  const ModelConfig& c = m.config();
  double matmul = 0;
  for (const ParamInfo& p : m.params().params()) {
    if (p.shape.size() != 2 || p.name.rfind("embedding.", 0) == 0) continue;
    matmul += static_cast<double>(p.numel);
  }
  int tied_heads = c.tie_embeddings ? 1 : 0;
  int attn_layers = c.num_layers;
  for (const ExitConfig& x : c.exits) {
    tied_heads += x.tied ? 1 : 0;
    attn_layers += x.kind == ExitKind::kBlock ? 1 : 0;
  }
  matmul += static_cast<double>(tied_heads) * c.vocab_size * c.hidden_size;
  const double q_width = static_cast<double>(c.num_heads) * c.head_dim();
  return 6.0 * matmul + 12.0 * attn_layers * q_width * seq;
}

// Sequences per micro-batch (the whole batch when unset).
int MicroBatch(const TrainBenchOptions& o) { return o.micro_batch > 0 ? o.micro_batch : o.batch; }

// Where the profiled step's time goes against the two limits measured in the same run: matrix
// products (GEMMs, attention) at the GEMM ceiling, every other op at the copy bandwidth.
void PrintStepBudget(const TrainBenchResult& r, double ceiling, double bandwidth) {
  struct Group {
    const char* name;
    double seconds = 0, at_limit = 0;
  };
  Group groups[] = {{"GEMMs (Linear and its backward)"},
                    {"attention"},
                    {"optimizer (AdamW, gradient norm and clip, zeroing)"},
                    {"other ops (norms, activations, RoPE, losses, copies)"}};
  for (const auto& op : r.ops) {
    const bool optimizer =
        op.name == "AdamW" || op.name == "SumSquares" || op.name == "Scale" || op.name == "Fill";
    Group& g = absl::StartsWith(op.name, "Linear")      ? groups[0]
               : absl::StartsWith(op.name, "Attention") ? groups[1]
               : optimizer                              ? groups[2]
                                                        : groups[3];
    g.seconds += op.seconds;
    g.at_limit += op.flops > 0 ? op.flops / ceiling : op.bytes / bandwidth;
  }
  double total = 0, at_limit = 0;
  for (const Group& g : groups) total += g.seconds, at_limit += g.at_limit;
  std::printf(
      "step budget: %.1f ms measured (ops synchronised), %.1f ms if every op ran at its limit "
      "(products at the GEMM ceiling, the rest at the copy bandwidth):\n",
      total * 1e3, at_limit * 1e3);
  for (const Group& g : groups) {
    std::printf("  %-52s %9.2f ms (%4.1f%%)  at the limit %8.2f ms  above it %8.2f ms\n", g.name,
                g.seconds * 1e3, total > 0 ? 100 * g.seconds / total : 0.0, g.at_limit * 1e3,
                (g.seconds - g.at_limit) * 1e3);
  }
}

// The GEMM ops of the profiled step by shape, slowest first, against the GEMM ceiling: which
// products hold the GEMMs' time above it (a shape of few rows or columns, an fp32 output, an
// accumulation into the output, an epilogue).
void PrintGemmShapes(const TrainBenchResult& r, double ceiling) {
  if (r.gemm_shapes.empty()) return;
  double total = 0, at_ceiling = 0;
  for (const auto& g : r.gemm_shapes) total += g.seconds, at_ceiling += g.flops / ceiling;
  std::printf(
      "GEMMs by shape (rows x out <- in; the backward's rows x out are dout's): %.1f ms, %.1f ms "
      "at the GEMM ceiling:\n",
      total * 1e3, at_ceiling * 1e3);
  for (const auto& g : r.gemm_shapes) {
    const double rate = g.seconds > 0 ? g.flops / g.seconds : 0;
    std::printf("  %-64s %9.2f ms %5lld calls %7.3g TFLOP/s (%3.0f%%)  above it %7.2f ms\n",
                g.name.c_str(), g.seconds * 1e3, static_cast<long long>(g.calls), rate / 1e12,
                100 * rate / ceiling, (g.seconds - g.flops / ceiling) * 1e3);
  }
}

}  // namespace

absl::StatusOr<TrainBenchResult> BenchTrainStep(const ModelConfig& mc, Backend* backend,
                                                const TrainBenchOptions& o) {
  ProfilingBackend prof(backend);
  // (The CPU's free memory is the machine's, which other processes move: device backends only.)
  const int64_t free_before =
      backend->device() == Device::kCpu ? -1 : backend->AvailableMemoryBytes();
  int64_t free_lowest = free_before;
  auto note_free = [&] {
    if (free_before >= 0) free_lowest = std::min(free_lowest, backend->AvailableMemoryBytes());
  };
  ASSIGN_OR_RETURN(auto model, Model::Create(mc, &prof));
  model->InitRandom(o.seed);
  auto ctx = ParallelContext::Single();
  AdamWConfig ac;
  DistributedOptimizer opt(&model->params(), ac, ctx.get(), false);
  const int micro = MicroBatch(o);
  if (o.batch % micro != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch ", o.batch, " is not a multiple of micro_batch ", micro));
  }
  PipelineExecutor exec(model.get(), ctx.get(), micro, o.seq, o.batch / micro, true);
  const size_t n = static_cast<size_t>(o.batch) * o.seq;
  std::vector<int32_t> ids(n), targets(n);
  Rng rng(o.seed);
  for (size_t i = 0; i < n; ++i) {
    ids[i] = static_cast<int32_t>(rng.Below(mc.vocab_size));
    targets[i] = static_cast<int32_t>(rng.Below(mc.vocab_size));
  }
  const std::vector<float> w = ExitLossWeights(mc, 1000000);
  auto step = [&] {
    model->params().ZeroGrads();
    LossReport r = exec.TrainStep(ids.data(), targets.data(), w);
    opt.Step(1e-4f);
    return r;
  };
  for (int i = 0; i < o.warmup; ++i) step();
  prof.Synchronize();
  note_free();
  const int64_t waits_before = prof.host_waits();
  Timer t;
  for (int i = 0; i < o.steps; ++i) step();
  const int64_t waits = prof.host_waits() - waits_before;
  prof.Synchronize();
  note_free();
  TrainBenchResult r;
  r.host_waits_per_step = static_cast<double>(waits) / o.steps;
  r.step_seconds = t.Seconds() / o.steps;
  r.tokens_per_second = static_cast<double>(n) / r.step_seconds;
  r.flops_per_token = FlopsPerToken(*model, o.seq);
  r.flops_per_second = r.flops_per_token * r.tokens_per_second;
  r.params = static_cast<int64_t>(model->params().size());
  // One more step with every op timed (synchronised around each op).
  prof.ResetStats();
  prof.set_timing(true);
  Timer pt;
  step();
  r.profiled_step_seconds = pt.Seconds();
  prof.set_timing(false);
  for (const auto& [op, s] : prof.stats())
    r.ops.push_back({op, s.seconds, s.calls, s.flops, s.bytes});
  for (const auto& [shape, s] : prof.gemm_shapes())
    r.gemm_shapes.push_back({shape, s.seconds, s.calls, s.flops, s.bytes});
  for (auto* ops : {&r.ops, &r.gemm_shapes}) {
    std::sort(ops->begin(), ops->end(),
              [](const TrainBenchResult::Op& a, const TrainBenchResult::Op& b) {
                return a.seconds > b.seconds;
              });
  }
  r.peak_bytes = prof.peak_bytes();
  note_free();
  if (free_before >= 0) r.device_bytes = free_before - free_lowest;
  return r;
}

// The model's forward GEMM shapes (the backward's are the same products transposed), timed in
// each precision the CUDA backend could use: whether bf16 operands converted beforehand would
// beat cuBLAS's FAST_16BF on fp32 data, which the cuda-bf16 backend uses today.
void PrintCudaGemmPrecisions(const ModelConfig& mc, const TrainBenchOptions& o) {
#ifdef EELLM_HAVE_CUDA
  const int n = o.batch * o.seq, h = mc.hidden_size, d = mc.head_dim();
  const int head_rows = std::min(n, std::max(1, (1 << 28) / mc.vocab_size));  // Model's GPU chunk
  std::vector<GemmShape> shapes = {{"q", n, mc.num_heads * d, h},
                                   {"k, v", n, mc.num_kv_heads * d, h},
                                   {"attention out", n, h, mc.num_heads * d},
                                   {"mlp in", n, mc.ffn_hidden_size, h},
                                   {"mlp out", n, h, mc.ffn_hidden_size},
                                   {"head (one chunk)", head_rows, mc.vocab_size, h}};
  auto t = MeasureCudaGemms(shapes);
  if (!t.ok()) {
    std::printf("GEMM precisions: not measured (%s)\n", t.status().ToString().c_str());
    return;
  }
  std::printf(
      "GEMM TFLOP/s by precision (fp32 SGEMM | FAST_16BF on fp32 data, as cuda-bf16 | "
      "bf16 operands, fp32 out | bf16 throughout; max |diff| / max |C| vs fp32):\n");
  for (const GemmTiming& g : *t) {
    std::printf("  %-17s %6d x %6d x %6d  %7.1f %7.1f %7.1f %7.1f   %.1e\n", g.shape.what.c_str(),
                g.shape.m, g.shape.n, g.shape.k, g.fp32, g.fast_bf16, g.bf16_in, g.bf16_all,
                g.max_rel_diff);
  }
#else
  (void)mc;
  (void)o;
#endif
}

namespace {

// Runs the PyTorch reference script on the same model, batch and steps (its output shown line by
// line as it comes, so that a log cut off by a time limit keeps what ran); returns its tokens/s.
absl::StatusOr<double> RunTorchReference(const TrainBenchOptions& o, Backend* backend,
                                         bool with_exits) {
  const std::string cmd = absl::StrCat(
      "PYTHONUNBUFFERED=1 ", o.python, " ", o.torch_reference, " --model '", o.model_path,
      "' --batch ", o.batch, " --micro-batch ", MicroBatch(o), " --seq ", o.seq, " --steps ",
      o.steps, " --warmup ", o.warmup, backend->device() == Device::kCpu ? " --device cpu" : "",
      with_exits ? "" : " --no-exits", " 2>&1");
  std::printf("PyTorch reference: %s\n", cmd.c_str());
  std::fflush(stdout);
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return absl::InternalError("cannot start " + cmd);
  std::string out;
  char line[4096];
  while (std::fgets(line, sizeof(line), p) != nullptr) {
    out += line;
    std::fputs(line, stdout);
    std::fflush(stdout);
  }
  const int rc = pclose(p);
  const size_t brace = out.rfind("{\"tokens_per_s\"");
  if (rc != 0 || brace == std::string::npos) {
    return absl::InternalError("the PyTorch reference failed (output above)");
  }
  nlohmann::json j = nlohmann::json::parse(out.substr(brace), nullptr, false);
  if (j.is_discarded() || !j.contains("tokens_per_s")) {
    return absl::InternalError("the PyTorch reference printed no result line");
  }
  return j["tokens_per_s"].get<double>();
}

}  // namespace

absl::Status RunTrainBenchmark(const ModelConfig& mc, Backend* backend,
                               const TrainBenchOptions& o) {
  std::printf(
      "model: %s, %d layers, hidden %d, heads %d/%d, vocab %d, %zu exits; batch %d x %d "
      "tokens; backend %s\n",
      mc.style == ModelStyle::kGpt ? "gpt" : "llama", mc.num_layers, mc.hidden_size, mc.num_heads,
      mc.num_kv_heads, mc.vocab_size, mc.exits.size(), o.batch, o.seq, backend->name().c_str());
  std::fflush(stdout);
  ASSIGN_OR_RETURN(TrainBenchResult r, BenchTrainStep(mc, backend, o));
  const double ceiling = GemmCeiling(backend);
  const double bandwidth = CopyBandwidth(backend);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  std::printf("parameters: %.1f M; model FLOPs per token: %.3g (6 N + attention, exits included)\n",
              r.params / 1e6, r.flops_per_token);
  std::printf("step: %.1f ms; %.0f tokens/s; %.3g TFLOP/s model\n", r.step_seconds * 1e3,
              r.tokens_per_second, r.flops_per_second / 1e12);
  std::printf("GEMM ceiling of this backend (%s, measured now): %.3g TFLOP/s -> %.1f%% of it\n",
              backend->name().c_str(), ceiling / 1e12, 100 * r.flops_per_second / ceiling);
  if (backend->device() == Device::kCuda) {
    std::printf("MFU against the 989 TFLOP/s bf16 dense peak of an H100/H200: %.1f%%\n",
                100 * r.flops_per_second / 989e12);
    PrintCudaGemmPrecisions(mc, o);
  }
  std::printf("memory: %.1f MB allocated through the backend at peak; process max RSS %.1f MB\n",
              r.peak_bytes / 1e6, ru.ru_maxrss / 1e3);
  std::printf(
      "host waits per step: %.1f (read-backs and synchronisations, each of which empties the "
      "device's queue)\n",
      r.host_waits_per_step);
  if (r.device_bytes >= 0) {
    std::printf(
        "device memory taken: %.1f MB (free before the model minus the lowest after a step: "
        "scratch and library workspaces included)\n",
        r.device_bytes / 1e6);
  }
  std::printf("memory bandwidth of this backend (device-to-device copy, measured now): %.0f GB/s\n",
              bandwidth / 1e9);
  // Per op: its time, its matrix products' rate (GEMMs; attention counts the causal half: 4 d
  // FLOPs per visible query-key pair and head forward, 2.5 times that backward), and the rate
  // of the least memory traffic it needs (each input read and each output written once) against
  // the copy bandwidth above: an op far below both limits has room to gain.
  std::printf(
      "per-op time of one step (each op synchronised: %.1f ms in all); TFLOP/s of its products, "
      "GB/s of its least traffic (%% of the copy bandwidth):\n",
      r.profiled_step_seconds * 1e3);
  double total = 0;
  for (const auto& op : r.ops) total += op.seconds;
  for (const auto& op : r.ops) {
    std::string rates;
    if (op.seconds > 0 && op.flops > 0) {
      rates += absl::StrFormat("  %7.3g TFLOP/s", op.flops / op.seconds / 1e12);
    }
    if (op.seconds > 0 && op.bytes > 0) {
      rates += absl::StrFormat("  %7.0f GB/s (%3.0f%%)", op.bytes / op.seconds / 1e9,
                               100 * op.bytes / op.seconds / bandwidth);
    }
    std::printf("  %-24s %9.2f ms %6.1f%% %7lld calls%s\n", op.name.c_str(), op.seconds * 1e3,
                100 * op.seconds / total, static_cast<long long>(op.calls), rates.c_str());
  }
  PrintStepBudget(r, ceiling, bandwidth);
  PrintGemmShapes(r, ceiling);
  double bare_tokens_per_second = 0;  // measured when compared without exits
  if (o.compare_without_exits && !mc.exits.empty()) {
    ModelConfig bare = mc;
    bare.exits.clear();
    ASSIGN_OR_RETURN(TrainBenchResult b, BenchTrainStep(bare, backend, o));
    bare_tokens_per_second = b.tokens_per_second;
    const double time_share = 1.0 - b.step_seconds / r.step_seconds;
    const double flop_share = 1.0 - b.flops_per_token / r.flops_per_token;
    std::printf(
        "without exits: %.1f ms per step, %.0f tokens/s: the exits take %.1f%% of the "
        "step time for %.1f%% of the FLOPs\n",
        b.step_seconds * 1e3, b.tokens_per_second, 100 * time_share, 100 * flop_share);
  }
  if (!o.torch_reference.empty()) {
    ASSIGN_OR_RETURN(const double ref, RunTorchReference(o, backend, /*with_exits=*/true));
    std::printf("eellm / PyTorch tokens/s: %.0f / %.0f = %.2fx\n", r.tokens_per_second, ref,
                r.tokens_per_second / ref);
    if (bare_tokens_per_second > 0) {
      ASSIGN_OR_RETURN(const double bare_ref, RunTorchReference(o, backend, /*with_exits=*/false));
      std::printf("without exits: eellm / PyTorch tokens/s: %.0f / %.0f = %.2fx\n",
                  bare_tokens_per_second, bare_ref, bare_tokens_per_second / bare_ref);
    }
  }
  return absl::OkStatus();
}

}  // namespace eellm
