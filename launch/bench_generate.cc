#include "launch/bench_generate.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"
#include "launch/context_length.h"
#include "models/generator.h"
#include "models/pipeline_generator.h"

namespace eellm {
namespace {

const char* const kPrompts[] = {
    "And God said",     "In the beginning",      "The LORD is my shepherd",
    "Blessed are the",  "And it came to pass",   "Then said Jesus unto",
    "For God so loved", "And the king answered",
};

struct Run {
  double seconds = 0;
  long tokens = 0, early = 0;
  double layers = 0;
  long drafted = 0, kept = 0, checks = 0;  // speculative decoding
  std::vector<std::vector<int32_t>> outputs;
  double TokensPerSecond() const { return tokens / seconds; }
};

void Add(Run& run, const GenerationResult& g) {
  run.tokens += static_cast<long>(g.tokens.size());
  run.drafted += g.drafted;
  run.kept += g.accepted;
  run.checks += g.checks;
  for (size_t i = 0; i < g.tokens.size(); ++i) {
    run.early += g.exit_index[i] >= 0;
    run.layers += g.depth[i];
  }
  run.outputs.push_back(g.tokens);
}

int SameOutputs(const Run& a, const Run& b) {
  int same = 0;
  for (size_t i = 0; i < a.outputs.size(); ++i) same += a.outputs[i] == b.outputs[i];
  return same;
}

std::vector<GenerationRequest> MakeRequests(const Tokenizer& tok, const GenerateBenchOptions& o) {
  std::vector<GenerationRequest> reqs(o.batch);
  for (int i = 0; i < o.batch; ++i) {
    const char* text = kPrompts[i % (sizeof(kPrompts) / sizeof(kPrompts[0]))];
    reqs[i].prompt = tok.Encode(text);
    if (reqs[i].prompt.empty()) reqs[i].prompt.push_back(tok.bos_id());
    reqs[i].max_new_tokens = o.new_tokens;
    reqs[i].sampling.temperature = o.temperature;
    reqs[i].sampling.seed = o.seed + i;
  }
  return reqs;
}

void PrintSetup(const ModelConfig& c, const std::vector<GenerationRequest>& reqs,
                const GenerateBenchOptions& o) {
  std::printf(
      "generation: %d sequences x %d new tokens, prompts of %zu-%zu tokens, %s; model: %d layers, "
      "hidden %d, exits at layers",
      o.batch, o.new_tokens, reqs[0].prompt.size(), reqs.back().prompt.size(),
      o.temperature > 0 ? absl::StrCat("temperature ", o.temperature).c_str() : "greedy",
      c.num_layers, c.hidden_size);
  for (const ExitConfig& x : c.exits) std::printf(" %d", x.layer);
  std::printf("\n");
}

// The table's header: the reference run's and the measured run's tokens/s columns.
void PrintHeader(const char* reference, const char* measured) {
  std::printf("\n%-9s | %-24s | %-24s | %-7s | %-8s | %-6s | %s\n", "threshold", reference,
              measured, "ratio", "avg layers", "early", "same tokens");
}

// A row: `run` against `reference` (same requests), and how many sequences' tokens agree.
void PrintRow(float threshold, const Run& reference, const Run& run) {
  const size_t n = run.outputs.size();
  const int same = SameOutputs(reference, run);
  const double ref_tps = reference.TokensPerSecond(), tps = run.TokensPerSecond();
  std::printf("%-9.2f | %24.1f | %24.1f | %6.2fx | %10.2f | %5.1f%% | %d of %zu\n", threshold,
              ref_tps, tps, tps / ref_tps, run.layers / run.tokens, 100.0 * run.early / run.tokens,
              same, n);
}

// `reqs` generated one at a time on `single`, and all together on `batched`.
absl::StatusOr<Run> OneAtATime(Generator& single, const std::vector<GenerationRequest>& reqs) {
  Run run;
  Timer t;
  for (const GenerationRequest& r : reqs) {
    ASSIGN_OR_RETURN(std::vector<GenerationResult> g, single.GenerateBatch({r}));
    Add(run, g[0]);
  }
  run.seconds = t.Seconds();
  return run;
}

absl::StatusOr<Run> Together(Generator& batched, const std::vector<GenerationRequest>& reqs) {
  Run run;
  Timer t;
  ASSIGN_OR_RETURN(std::vector<GenerationResult> g, batched.GenerateBatch(reqs));
  run.seconds = t.Seconds();
  for (const GenerationResult& r : g) Add(run, r);
  return run;
}

// Self-speculative decoding (each exit of o.draft_exits drafting) against the full model, one at
// a time and batched.
absl::Status SpeculativeRows(Generator& single, Generator& batched,
                             std::vector<GenerationRequest> reqs, const GenerateBenchOptions& o) {
  for (auto& r : reqs) r.early_exit.threshold = 1.0f;
  ASSIGN_OR_RETURN(const Run full_one, OneAtATime(single, reqs));
  ASSIGN_OR_RETURN(const Run full_all, Together(batched, reqs));
  std::printf(
      "\nself-speculative decoding (at most %d drafts a round, ending at a draft less confident "
      "than %.2f) against the full model:\n",
      o.draft_tokens, o.draft_confidence);
  std::printf("%-10s | %-26s | %-26s | %-6s | %-13s | %s\n", "draft exit", "one at a time tokens/s",
              "batched tokens/s", "kept", "tokens / pass", "same tokens");
  std::printf("%-10s | %8s %8s %7s | %8s %8s %7s |\n", "", "full", "spec", "ratio", "full", "spec",
              "ratio");
  for (int layer : o.draft_exits) {
    for (auto& r : reqs) r.speculative = {layer, o.draft_tokens, o.draft_confidence};
    ASSIGN_OR_RETURN(const Run one, OneAtATime(single, reqs));
    ASSIGN_OR_RETURN(const Run all, Together(batched, reqs));
    std::printf("%-10d | %8.1f %8.1f %6.2fx | %8.1f %8.1f %6.2fx | %5.1f%% | %13.2f | %d of %zu\n",
                layer, full_one.TokensPerSecond(), one.TokensPerSecond(),
                one.TokensPerSecond() / full_one.TokensPerSecond(), full_all.TokensPerSecond(),
                all.TokensPerSecond(), all.TokensPerSecond() / full_all.TokensPerSecond(),
                one.drafted > 0 ? 100.0 * one.kept / one.drafted : 0.0,
                static_cast<double>(one.tokens) / one.checks, SameOutputs(full_one, one),
                reqs.size());
  }
  std::printf(
      "\n\"kept\": drafts the full model agreed with; \"tokens / pass\": tokens per "
      "full-model pass (prefill included); \"same tokens\": sequences equal to the full "
      "model's\n");
  return absl::OkStatus();
}

// Shortened requests, run first so that caches, thread pools and buffers are warm.
std::vector<GenerationRequest> WarmUp(std::vector<GenerationRequest> reqs,
                                      const GenerateBenchOptions& o) {
  for (auto& r : reqs) r.max_new_tokens = std::min(4, o.new_tokens);
  return reqs;
}

}  // namespace

absl::StatusOr<int> GenerateBenchContext(const ModelConfig& c, const Tokenizer& tok,
                                         const GenerateBenchOptions& o) {
  int64_t needed = 0;
  for (const GenerationRequest& r : MakeRequests(tok, o)) {
    needed = std::max<int64_t>(needed, static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens);
  }
  return ContextLength(c, o.max_model_len, needed);
}

absl::Status RunGenerateBenchmark(Model* model, const Tokenizer& tok,
                                  const GenerateBenchOptions& o) {
  const ModelConfig& c = model->config();
  std::vector<GenerationRequest> reqs = MakeRequests(tok, o);
  ASSIGN_OR_RETURN(const int context, GenerateBenchContext(c, tok, o));
  Generator batched(model, context, o.batch), single(model, context, 1);
  for (const GenerationRequest& r : reqs) {
    RETURN_IF_ERROR(batched.Validate(r));
  }
  PrintSetup(c, reqs, o);
  PrintHeader("one at a time tokens/s", "batched tokens/s");
  {
    const std::vector<GenerationRequest> w = WarmUp(reqs, o);
    auto unused = batched.GenerateBatch(w);
    RETURN_IF_ERROR(unused.status());
    RETURN_IF_ERROR(single.GenerateBatch({w[0]}).status());
  }
  for (float th : o.thresholds) {
    for (auto& r : reqs) r.early_exit.threshold = th;
    ASSIGN_OR_RETURN(const Run one, OneAtATime(single, reqs));
    ASSIGN_OR_RETURN(const Run all, Together(batched, reqs));
    PrintRow(th, one, all);
  }
  std::printf(
      "\ntokens/s count every generated token over the wall time of prefill and decode; \"same "
      "tokens\": sequences whose batched tokens equal their one-at-a-time tokens (floating-point "
      "rounding of batched GEMMs may differ on some backends)\n");
  if (o.draft_exits.empty()) return absl::OkStatus();
  return SpeculativeRows(single, batched, std::move(reqs), o);
}

absl::Status RunPipelineGenerateBenchmark(Model* whole, PipelineGenerator* pipeline,
                                          const Tokenizer& tok, const GenerateBenchOptions& o) {
  const ModelConfig& c = pipeline->generator().model()->config();
  std::vector<GenerationRequest> reqs = MakeRequests(tok, o);
  const bool leader = pipeline->leader();
  std::unique_ptr<Generator> one;
  if (leader) {
    EE_CHECK(whole != nullptr, "the pipeline's leader needs the whole model");
    ASSIGN_OR_RETURN(const int context, GenerateBenchContext(c, tok, o));
    one = std::make_unique<Generator>(whole, context, o.batch);
    PrintSetup(c, reqs, o);
    std::printf("pipeline: %d stages x tensor parallelism %d, one process per stage shard\n",
                pipeline->stages(), pipeline->tp());
    PrintHeader("one process tokens/s", "pipeline tokens/s");
  }
  {
    const std::vector<GenerationRequest> w = WarmUp(reqs, o);
    if (leader) RETURN_IF_ERROR(one->GenerateBatch(w).status());
    RETURN_IF_ERROR(pipeline->GenerateBatch(w).status());
  }
  std::vector<std::string> busy_lines;  // the pipeline's ranks' time in their passes
  for (float th : o.thresholds) {
    for (auto& r : reqs) r.early_exit.threshold = th;
    Run alone, piped;
    Timer t;
    if (leader) {  // the other ranks wait for the pipeline meanwhile
      auto g = one->GenerateBatch(reqs);
      RETURN_IF_ERROR(g.status());
      alone.seconds = t.Seconds();
      for (const GenerationResult& r : *g) Add(alone, r);
    }
    const std::vector<double> busy_before = pipeline->PassSecondsOfEveryRank();
    t.Reset();
    auto g = pipeline->GenerateBatch(reqs);
    RETURN_IF_ERROR(g.status());
    piped.seconds = t.Seconds();
    const std::vector<double> busy = pipeline->PassSecondsOfEveryRank();
    if (!leader) continue;
    std::string shares;
    for (size_t r = 0; r < busy.size(); ++r) {
      absl::StrAppendFormat(&shares, "%s%.0f%%", r == 0 ? "" : " ",
                            100.0 * (busy[r] - busy_before[r]) / piped.seconds);
    }
    busy_lines.push_back(absl::StrCat("threshold ", absl::StrFormat("%.2f", th),
                                      ": time in passes, per rank: ", shares));
    for (const GenerationResult& r : *g) Add(piped, r);
    PrintRow(th, alone, piped);
  }
  if (leader) {
    std::printf("\n");
    for (const std::string& line : busy_lines) std::printf("%s\n", line.c_str());
    std::printf(
        "\nboth generate the whole batch together (the one process with the whole model, on rank "
        "0); tokens/s count every generated token over the wall time of prefill and decode\n");
  }
  return absl::OkStatus();
}

}  // namespace eellm
