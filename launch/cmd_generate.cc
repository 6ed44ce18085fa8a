// `eellm generate`: loads a checkpoint and generates text with early exit, printing the text,
// decode speed, average layers used and the exit histogram (optionally beside a full-model run);
// or with self-speculative decoding (--draft_exit), printing the share of drafts kept.
// Under mpirun or Slurm the processes generate together: one tensor-parallel group, or a pipeline
// of them (--pp; models/pipeline_generator.h).
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/context_length.h"
#include "launch/inference_group.h"
#include "launch/shared_flags.h"
#include "models/exit_loss_weights.h"
#include "models/generator.h"
#include "models/pipeline_generator.h"
#include "models/tokenizer.h"

ABSL_FLAG(std::string, prompt, "And God said", "prompt text");
ABSL_FLAG(int, max_new_tokens, 200, "tokens to generate at most (stops earlier at EOS)");
ABSL_FLAG(double, threshold, 0.8,
          "early-exit confidence threshold: an exit fires when its max probability reaches it; "
          "1.0 disables early exit");
ABSL_FLAG(std::string, exit_layers, "",
          "comma-separated exit layer numbers allowed to fire (empty = all)");
ABSL_FLAG(int, top_k, 0, "sample among the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "nucleus sampling probability mass (1 = off)");
ABSL_FLAG(bool, compare, false, "also generate without early exit and print both speeds");
ABSL_FLAG(int, draft_exit, 0,
          "self-speculative decoding instead of early exit: the layer of the exit that drafts "
          "--draft_tokens tokens a round for one full-model pass to check; the output is the full "
          "model's (greedy: the same tokens); 0 = off");

namespace eellm {
namespace {

void PrintStats(const char* label, const ModelConfig& c, const GenerationResult& g) {
  std::printf("[%s] %zu tokens, prefill %.3f s, decode %.1f tokens/s, average layers %.2f of %d\n",
              label, g.tokens.size(), g.prefill_seconds, g.DecodeTokensPerSecond(),
              g.AverageLayers(), c.num_layers);
  std::map<int, int> hist;
  for (int e : g.exit_index) hist[e]++;
  std::printf("[%s] exit histogram:", label);
  for (size_t i = 0; i <= c.exits.size(); ++i) {
    const int idx = i < c.exits.size() ? static_cast<int>(i) : -1;
    const std::string name = ExitName(c, idx);
    const int k = hist.count(idx) ? hist[idx] : 0;
    std::printf(" %s %d (%.0f%%)", name.c_str(), k,
                g.tokens.empty() ? 0.0 : 100.0 * k / g.tokens.size());
  }
  std::printf("\n");
  if (g.checks > 0) {
    std::printf("[%s] drafts kept %d of %d (%.0f%%), %.2f tokens per full-model pass (%d passes)\n",
                label, g.accepted, g.drafted, g.drafted > 0 ? 100.0 * g.accepted / g.drafted : 0.0,
                static_cast<double>(g.tokens.size()) / g.checks, g.checks);
  }
}

}  // namespace

int RunGenerateCommand() {
  // Under mpirun or Slurm each rank loads its shard (stage and tensor-parallel share) and runs
  // its part of the same generation; rank 0 prints.
  InferenceGroup group;
  auto Fail = [&](const absl::Status& s) { return group.Fail(s); };
  if (absl::Status s = StartInferenceGroup(&group, absl::GetFlag(FLAGS_tp), absl::GetFlag(FLAGS_pp),
                                           "generation");
      !s.ok()) {
    return Fail(s);
  }
  if (absl::Status s = group.QuietOtherRanks(); !s.ok()) return Fail(s);
  const std::string path = absl::GetFlag(FLAGS_checkpoint);
  if (path.empty()) return Fail(absl::InvalidArgumentError("--checkpoint is required"));
  EarlyExitParams ee;
  ee.threshold = static_cast<float>(absl::GetFlag(FLAGS_threshold));
  SpeculativeParams spec;
  spec.exit_layer = absl::GetFlag(FLAGS_draft_exit);
  spec.draft_tokens = absl::GetFlag(FLAGS_draft_tokens);
  spec.min_confidence = static_cast<float>(absl::GetFlag(FLAGS_draft_confidence));
  if (spec.enabled()) {
    ee.threshold = 1.0f;  // the full model decides every token
    std::printf("self-speculative decoding: --threshold and --exit_layers do not apply\n");
  }
  if (!(ee.threshold > 0 && ee.threshold <= 1)) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--threshold must be in (0, 1], got ", absl::GetFlag(FLAGS_threshold))));
  }
  SamplingParams sp;
  sp.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  sp.top_k = absl::GetFlag(FLAGS_top_k);
  sp.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  sp.seed = absl::GetFlag(FLAGS_seed);
  if (sp.temperature < 0 || sp.top_k < 0 || !(sp.top_p > 0 && sp.top_p <= 1)) {
    return Fail(
        absl::InvalidArgumentError("need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1"));
  }
  if (absl::Status s = LoadInferenceModel(&group, path, absl::GetFlag(FLAGS_backend)); !s.ok()) {
    return Fail(s);
  }
  Model& model = *group.loaded.model;
  const Tokenizer& tok = *group.tokenizer;
  const ModelConfig& c = model.config();
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_exit_layers), ',', absl::SkipEmpty())) {
    int layer;
    bool known = false;
    if (absl::SimpleAtoi(part, &layer)) {
      for (const auto& x : c.exits) known |= x.layer == layer;
    }
    if (!known) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--exit_layers: \"", part, "\" is not the layer of an exit in this model")));
    }
    ee.exit_layers.push_back(layer);
  }
  std::vector<int32_t> prompt = tok.Encode(absl::GetFlag(FLAGS_prompt));
  if (prompt.empty()) prompt.push_back(tok.bos_id());
  const int max_new = absl::GetFlag(FLAGS_max_new_tokens);
  // The context: what this prompt and completion need (not a long-context model's whole one).
  auto context = ContextLength(c, absl::GetFlag(FLAGS_max_model_len),
                               static_cast<int64_t>(prompt.size()) + std::max(max_new, 0));
  if (!context.ok()) return Fail(context.status());
  Generator gen(&model, *context);
  gen.set_token_limit(group.token_limit);
  std::unique_ptr<PipelineGenerator> pipeline;
  if (group.pp > 1) {
    pipeline = std::make_unique<PipelineGenerator>(&gen, group.messages.get(), group.pp, group.tp);
  }
  // Rank 0 gets the result; the pipeline's other ranks an empty one.
  auto generate = [&](const EarlyExitParams& params,
                      const SpeculativeParams& speculative) -> absl::StatusOr<GenerationResult> {
    GenerationRequest q;
    q.prompt = prompt;
    q.max_new_tokens = max_new;
    q.eos_id = tok.eos_id();
    q.sampling = sp;
    q.early_exit = params;
    q.speculative = speculative;
    ASSIGN_OR_RETURN(std::vector<GenerationResult> r,
                     pipeline != nullptr ? pipeline->GenerateBatch({q}) : gen.GenerateBatch({q}));
    return r.empty() ? GenerationResult() : std::move(r[0]);
  };
  if (group.pp > 1) {
    std::printf("pipeline of %d stages x tensor parallelism %d (%d layers each)\n", group.pp,
                group.tp, c.num_layers / group.pp);
  }

  GenerationResult full;
  if (absl::GetFlag(FLAGS_compare)) {
    EarlyExitParams off = ee;
    off.threshold = 1.0f;
    auto r = generate(off, SpeculativeParams());
    if (!r.ok()) return Fail(r.status());
    full = *r;
    std::printf("--- full model (threshold 1.0) ---\n%s%s\n", absl::GetFlag(FLAGS_prompt).c_str(),
                tok.Decode(full.tokens).c_str());
    PrintStats("full", c, full);
  }
  auto r = generate(ee, spec);
  if (!r.ok()) return Fail(r.status());
  const std::string mode =
      spec.enabled()
          ? absl::StrCat("self-speculative (exit at layer ", spec.exit_layer, " drafts ",
                         spec.draft_tokens, " tokens a round)")
          : absl::StrCat("early exit (threshold ", absl::StrFormat("%.2f", ee.threshold), ")");
  std::printf("--- %s ---\n%s%s\n", mode.c_str(), absl::GetFlag(FLAGS_prompt).c_str(),
              tok.Decode(r->tokens).c_str());
  PrintStats(spec.enabled() ? "speculative" : "early-exit", c, *r);
  if (absl::GetFlag(FLAGS_compare) && full.DecodeTokensPerSecond() > 0) {
    size_t same = 0;
    while (same < r->tokens.size() && same < full.tokens.size() &&
           r->tokens[same] == full.tokens[same])
      ++same;
    std::printf(
        "speedup %.2fx (%.1f vs %.1f tokens/s); first %zu tokens identical to the full model%s\n",
        r->DecodeTokensPerSecond() / full.DecodeTokensPerSecond(), r->DecodeTokensPerSecond(),
        full.DecodeTokensPerSecond(), same,
        spec.enabled() && sp.temperature > 0
            ? " (sampled: speculative decoding keeps the full model's distribution, not its draws)"
            : "");
  }
  return 0;
}

}  // namespace eellm
