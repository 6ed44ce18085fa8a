// `eellm bench train` (launch/bench_train.h), `eellm bench generate` (launch/bench_generate.h),
// `eellm bench attention` (launch/bench_attention.h) and `eellm bench checkpoint`: checkpoint
// save and
// load throughput against the disk's raw
// sequential write speed (dd with fdatasync, run in the same command on the same directory).
// Reports MB/s of tensor bytes (parameters plus AdamW moments) for a single-file save, a
// sharded save of the 4 ranks of a tp 2 x pp 2 layout, and loads of both into a whole model.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/core/rng.h"
#include "engine/core/timer.h"
#include "launch/bench_attention.h"
#include "launch/bench_generate.h"
#include "launch/bench_train.h"
#include "launch/checkpoint_layout.h"
#include "launch/commands.h"
#include "launch/inference_group.h"
#include "launch/shared_flags.h"
#include "models/generator.h"
#include "models/pipeline_generator.h"
#include "models/transformer.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, what, "",
          "benchmark to run: train, generate or checkpoint (or the first argument)");
ABSL_FLAG(int, batch, 8,
          "train: sequences per step; generate: sequences generated together; attention: "
          "sequences");
ABSL_FLAG(int, seq, 256, "train, attention: tokens per sequence");
ABSL_FLAG(int, micro_batch, 0, "train: sequences per microbatch (0 = batch)");
ABSL_FLAG(int, warmup, 2, "train, attention: untimed steps (runs) first");
ABSL_FLAG(bool, compare_without_exits, true,
          "train: also time the model without its exits (their share of time vs of FLOPs)");
ABSL_FLAG(std::string, torch_reference, "",
          "train: PyTorch reference script run in the same command (tools/bench_torch.py)");
ABSL_FLAG(std::string, python, "python3", "train: Python for the PyTorch reference");
ABSL_FLAG(std::string, dir, "/tmp/eellm_bench", "scratch directory (removed afterwards)");
ABSL_FLAG(int, new_tokens, 128, "generate: tokens generated per sequence");
ABSL_FLAG(std::string, thresholds, "1.0,0.8", "generate: early-exit thresholds to run");
ABSL_FLAG(std::string, draft_exits, "",
          "generate: layers of the exits that draft for self-speculative decoding, a row each "
          "against the full model (empty = none)");
ABSL_FLAG(std::string, model, "",
          "model config JSON (a model config, or a run config's \"model\" section); train: "
          "required; checkpoint: default Llama style, hidden 512, 8 layers, vocab 32000");

namespace eellm {
namespace {

namespace fs = std::filesystem;

// Sequential write speed of `dir` in MB/s measured by dd (1 MiB blocks, fdatasync at the end).
double DdWriteMBps(const std::string& dir, int64_t mb) {
  const std::string file = dir + "/dd.bin";
  const std::string cmd =
      absl::StrCat("dd if=/dev/zero of='", file, "' bs=1M count=", mb, " conv=fdatasync 2>&1");
  Timer t;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return 0;
  char buf[512];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) {
  }
  const int rc = pclose(p);
  const double s = t.Seconds();
  std::error_code ec;
  fs::remove(file, ec);
  return rc == 0 ? (mb * 1048576.0 / 1e6) / s : 0;
}

int BenchCheckpoint() {
  ModelConfig c;
  if (!absl::GetFlag(FLAGS_model).empty()) {
    auto loaded = LoadModelConfig(absl::GetFlag(FLAGS_model));
    if (!loaded.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(loaded.status().message()).c_str());
      return 1;
    }
    c = *loaded;
  } else {
    auto parsed = ParseModelConfig(
        R"({"style": "llama", "vocab_size": 32000, "hidden_size": 512, "num_layers": 8,
            "num_heads": 8, "num_kv_heads": 4, "ffn_hidden_size": 1408, "max_seq_len": 1024,
            "exits": [{"layer": 4, "kind": "norm"}]})");
    c = *parsed;
  }
  auto be = MakeBackend("cpu");
  auto model = Model::Create(c, be->get());
  if (!model.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  ParamStore& ps = (*model)->params();
  Rng rng(1);
  float* p = ps.params_data();
  for (size_t i = 0; i < ps.size(); ++i) p[i] = static_cast<float>(rng.Normal()) * 0.02f;
  Buffer m(be->get(), ps.padded_size() * sizeof(float)), v(be->get(), ps.padded_size() * 4);
  for (size_t i = 0; i < ps.size(); ++i) {
    m.f32()[i] = p[i] * 0.1f;
    v.f32()[i] = p[i] * p[i];
  }
  const double mb = 3.0 * ps.size() * sizeof(float) / 1e6;  // parameters + two moments
  const std::string dir = absl::GetFlag(FLAGS_dir);
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir, ec);
  std::printf(
      "model: %.1f M parameters; a checkpoint holds %.0f MB of tensors (fp32 "
      "parameters and AdamW moments)\n",
      ps.size() / 1e6, mb);
  const double dd = DdWriteMBps(dir, static_cast<int64_t>(mb));
  std::printf("%-44s %8.0f MB/s\n", "dd write (1 MiB blocks, fdatasync)", dd);
  CheckpointMeta meta;
  meta.config_json = c.ToJson();
  auto report = [&](const char* what, double seconds) {
    std::printf("%-44s %8.0f MB/s  (%.2f s, %.2fx dd)\n", what, mb / seconds, seconds,
                dd > 0 ? (mb / seconds) / dd : 0.0);
  };
  Timer t;
  absl::Status s = SaveCheckpoint(dir + "/single.h5", ps, meta, m.f32(), v.f32());
  if (s.ok()) report("save, one file", t.Seconds());
  // The ranks of a tp 2 x pp 2 job, each writing its shard (here one after another).
  auto chunks = SplitForLayout(**model, m.f32(), v.f32(), 2, 2);
  t.Reset();
  auto sharded = !s.ok()       ? absl::StatusOr<std::string>(s)
                 : chunks.ok() ? WriteLayoutChunks(dir + "/sharded", meta, *chunks)
                               : absl::StatusOr<std::string>(chunks.status());
  if (sharded.ok()) report("save, tp 2 x pp 2 shards + top-level file", t.Seconds());
  for (const auto& [what, path] :
       {std::pair<const char*, std::string>{"load, one file", dir + "/single.h5"},
        {"load, sharded (reassembled whole)", dir + "/sharded"}}) {
    if (!s.ok() || !sharded.ok()) break;
    auto fresh = Model::Create(c, be->get());
    Buffer fm(be->get(), ps.padded_size() * 4), fv(be->get(), ps.padded_size() * 4);
    t.Reset();
    s = LoadCheckpoint(path, (*fresh)->params(), fm.f32(), fv.f32());
    if (s.ok()) report(what, t.Seconds());
  }
  fs::remove_all(dir, ec);
  if (!s.ok() || !sharded.ok()) {
    std::fprintf(stderr, "error: %s\n",
                 std::string((s.ok() ? sharded.status() : s).message()).c_str());
    return 1;
  }
  std::printf("(loads read from the page cache: the files were just written)\n");
  return 0;
}

// A model config from a file holding either a model config or a run config.
absl::StatusOr<ModelConfig> ReadModel(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open --model ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(path + " is not valid JSON");
  auto c = ParseModelConfig(j.contains("model") ? j["model"].dump() : ss.str());
  if (!c.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", c.status().message()));
  return *c;
}

// Prints the error and returns the command's exit code 1.
int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

// What `bench train` and `bench attention` start from: --model's config and --backend.
struct ModelAndBackend {
  ModelConfig model;
  std::unique_ptr<Backend> backend;
};
// Fills `out` from the flags and returns 0, or says what is wrong and returns the command's exit
// code (2: no --model, `example` naming a config to suggest; 1: a bad file or backend).
int ModelAndBackendFromFlags(const char* example, ModelAndBackend* out) {
  if (absl::GetFlag(FLAGS_model).empty()) {
    Fail(absl::InvalidArgumentError(absl::StrCat("--model is required (e.g. ", example, ")")));
    return 2;
  }
  auto mc = ReadModel(absl::GetFlag(FLAGS_model));
  if (!mc.ok()) return Fail(mc.status());
  auto be = MakeBackend(absl::GetFlag(FLAGS_backend));
  if (!be.ok()) return Fail(be.status());
  out->model = *std::move(mc);
  out->backend = *std::move(be);
  return 0;
}

int BenchTrain() {
  ModelAndBackend mb;
  if (int code = ModelAndBackendFromFlags("configs/kjv_demo.json", &mb)) return code;
  const ModelConfig* mc = &mb.model;
  TrainBenchOptions o;
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seq = absl::GetFlag(FLAGS_seq);
  o.micro_batch = absl::GetFlag(FLAGS_micro_batch);
  o.steps = absl::GetFlag(FLAGS_steps) > 0 ? absl::GetFlag(FLAGS_steps) : 5;
  o.warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  o.compare_without_exits = absl::GetFlag(FLAGS_compare_without_exits);
  o.model_path = absl::GetFlag(FLAGS_model);
  o.torch_reference = absl::GetFlag(FLAGS_torch_reference);
  o.python = absl::GetFlag(FLAGS_python);
  if (o.seq > mc->max_seq_len) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--seq ", o.seq, " exceeds the model's max_seq_len ", mc->max_seq_len)));
  }
  absl::Status s = RunTrainBenchmark(*mc, mb.backend.get(), o);
  return s.ok() ? 0 : Fail(s);
}

int BenchAttention() {
  ModelAndBackend mb;
  if (int code = ModelAndBackendFromFlags("configs/bench/llama_1p3b.json", &mb)) return code;
  AttentionBenchOptions o;
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seq = absl::GetFlag(FLAGS_seq);
  o.steps = absl::GetFlag(FLAGS_steps) > 0 ? absl::GetFlag(FLAGS_steps) : 10;
  o.warmup = absl::GetFlag(FLAGS_warmup);
  o.seed = absl::GetFlag(FLAGS_seed);
  auto r = RunAttentionBenchmark(mb.model, mb.backend.get(), o);
  return r.ok() ? 0 : Fail(r.status());
}

int BenchGenerate() {
  GenerateBenchOptions o;
  o.batch = absl::GetFlag(FLAGS_batch);
  o.new_tokens = absl::GetFlag(FLAGS_new_tokens);
  o.max_model_len = absl::GetFlag(FLAGS_max_model_len);
  o.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  o.seed = absl::GetFlag(FLAGS_seed);
  o.thresholds.clear();
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_thresholds), ',')) {
    double th;
    if (!absl::SimpleAtod(part, &th) || !(th > 0 && th <= 1)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--thresholds: \"", part, "\" is not a threshold in (0, 1]")));
    }
    o.thresholds.push_back(static_cast<float>(th));
  }
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_draft_exits), ',', absl::SkipEmpty())) {
    int layer;
    if (!absl::SimpleAtoi(part, &layer) || layer < 1) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--draft_exits: \"", part, "\" is not a layer number")));
    }
    o.draft_exits.push_back(layer);
  }
  o.draft_tokens = absl::GetFlag(FLAGS_draft_tokens);
  o.draft_confidence = static_cast<float>(absl::GetFlag(FLAGS_draft_confidence));
  if (o.batch < 1 || o.new_tokens < 1 || !(o.temperature >= 0)) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("need --batch >= 1, --new_tokens >= 1 and --temperature >= 0, got ", o.batch,
                     ", ", o.new_tokens, ", ", o.temperature)));
  }
  if (absl::GetFlag(FLAGS_checkpoint).empty()) {
    return Fail(absl::InvalidArgumentError("--checkpoint is required (e.g. runs/kjv_demo)"));
  }
  // Under mpirun: a pipeline (of tensor-parallel groups) against one process; rank 0 prints.
  InferenceGroup group;
  if (absl::Status s = StartInferenceGroup(&group, absl::GetFlag(FLAGS_tp), absl::GetFlag(FLAGS_pp),
                                           "the benchmark");
      !s.ok()) {
    return group.Fail(s);
  }
  if (absl::Status s =
          LoadInferenceModel(&group, absl::GetFlag(FLAGS_checkpoint), absl::GetFlag(FLAGS_backend));
      !s.ok()) {
    return group.Fail(s);
  }
  if (!group.multi) {
    absl::Status s = RunGenerateBenchmark(group.loaded.model.get(), *group.tokenizer, o);
    return s.ok() ? 0 : Fail(s);
  }
  if (!o.draft_exits.empty()) {
    return group.Fail(absl::InvalidArgumentError(
        "--draft_exits runs in one process (speculative decoding does not run in a pipeline)"));
  }
  InferenceGroup whole;  // rank 0: the whole model, in this process alone
  if (group.launch.rank == 0) {
    if (absl::Status s = LoadInferenceModel(&whole, absl::GetFlag(FLAGS_checkpoint),
                                            absl::GetFlag(FLAGS_backend));
        !s.ok()) {
      return group.Fail(s);
    }
  } else if (absl::Status s = group.QuietOtherRanks(); !s.ok()) {
    return group.Fail(s);
  }
  Model& stage = *group.loaded.model;
  auto context = GenerateBenchContext(stage.config(), *group.tokenizer, o);
  if (!context.ok()) return group.Fail(context.status());
  Generator stage_generator(&stage, *context, o.batch);
  PipelineGenerator pipeline(&stage_generator, group.messages.get(), group.pp, group.tp);
  absl::Status s =
      RunPipelineGenerateBenchmark(whole.loaded.model.get(), &pipeline, *group.tokenizer, o);
  return s.ok() ? 0 : group.Fail(s);
}

}  // namespace

int RunBenchCommand() {
  if (absl::GetFlag(FLAGS_what) == "checkpoint") return BenchCheckpoint();
  if (absl::GetFlag(FLAGS_what) == "train") return BenchTrain();
  if (absl::GetFlag(FLAGS_what) == "generate") return BenchGenerate();
  if (absl::GetFlag(FLAGS_what) == "attention") return BenchAttention();
  std::fprintf(stderr, "error: unknown benchmark '%s' (train, generate, attention or checkpoint)\n",
               absl::GetFlag(FLAGS_what).c_str());
  return 2;
}

}  // namespace eellm
