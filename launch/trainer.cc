#include "launch/trainer.h"

#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoints/sharded_checkpoint.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"
#include "engine/optim/adamw.h"
#include "engine/optim/schedules.h"
#include "launch/checkpoint_layout.h"
#include "launch/metrics_log.h"
#include "launch/progress.h"
#include "launch/timeline_gather.h"
#include "launch/training_data.h"
#include "launch/tuning_setup.h"
#include "models/epoch_sampler.h"
#include "models/exit_loss_weights.h"
#include "models/pipeline_executor.h"
#include "models/token_dataset.h"
#include "models/tokenizer.h"
#include "models/transformer.h"
#include "nlohmann/json.hpp"
#include "parallel/comm/host_values.h"
#include "parallel/distributed_optimizer.h"

namespace eellm {
namespace {

// Validation over the first `max_batches` global batches of `global_batch` rows; each
// data-parallel rank evaluates its rows (through the pipeline), and the means of every head are
// summed over stages (each head lives on one) and averaged over data-parallel ranks.
EvalResult Evaluate(PipelineExecutor& exec, const ModelConfig& c, Backend* be,
                    const TokenDataset& val, int max_batches, int global_batch, int rows, int t,
                    ParallelContext& ctx) {
  const int first = ctx.coord.dp * rows;
  std::vector<int32_t> in(static_cast<size_t>(global_batch) * t), tg(in.size());
  std::vector<double> sums(1 + c.exits.size(), 0.0);
  const int64_t batches = std::min<int64_t>(max_batches, val.NumSequentialBatches(global_batch, t));
  for (int64_t i = 0; i < batches; ++i) {
    val.SequentialBatch(i, global_batch, t, in.data(), tg.data());
    const size_t off = static_cast<size_t>(first) * t;
    LossReport r = exec.Evaluate(in.data() + off, tg.data() + off);
    sums[0] += r.final_loss;
    for (size_t k = 0; k < c.exits.size(); ++k) sums[1 + k] += r.exit_losses[k];
  }
  SumOverGroup(ctx.pp.get(), be, sums);
  SumOverGroup(ctx.dp.get(), be, sums);
  EvalResult e;
  const double denom = static_cast<double>(batches) * ctx.grid.dp();
  e.final_loss = sums[0] / denom;
  for (size_t k = 0; k < c.exits.size(); ++k) e.exit_losses.push_back(sums[1 + k] / denom);
  return e;
}

// The measured timeline next to the cost model's, with per-stage costs taken from the
// measurement (mean forward, backward and exit-head time per microbatch on each stage).
void PrintTimeline(const Timeline& measured, const Schedule& schedule) {
  PipelineCosts costs = UniformCosts(measured.stages, 0, 0, 0);
  for (int s = 0; s < measured.stages; ++s) {
    double f = 0, b = 0, e = 0;
    int nf = 0, nb = 0, ne = 0;
    for (const BusyInterval& i : measured.busy[s]) {
      const double d = i.end - i.start;
      if (i.action.type == ActionType::kForward) f += d, ++nf;
      if (i.action.type == ActionType::kBackward) b += d, ++nb;
      if (i.action.type == ActionType::kExitHeads) e += d, ++ne;
    }
    costs.forward[s] = nf ? f / nf : 0;
    costs.backward[s] = nb ? b / nb : 0;
    costs.exit[s] = ne ? e / ne : 0;
  }
  std::printf(
      "pipeline timeline of the last step (%s, %d stages, %d microbatches; F forward, "
      "B backward, E exit heads, . idle):\n",
      schedule.name.c_str(), schedule.stages, schedule.microbatches);
  std::printf("measured: %.1f ms, bubble fraction %.3f\n%s", measured.makespan * 1e3,
              BubbleFraction(measured), RenderTimeline(measured, 72).c_str());
  auto simulated = Simulate(schedule, costs);
  if (simulated.ok()) {
    std::printf("cost model with the measured per-stage costs: %.1f ms, bubble fraction %.3f\n%s",
                simulated->makespan * 1e3, BubbleFraction(*simulated),
                RenderTimeline(*simulated, 72).c_str());
  }
}

// The run's learning-rate schedule (train_config.cc has checked the style).
LrSchedule LrScheduleOf(const TrainConfig& tc) {
  LrSchedule s;
  s.max_lr = tc.lr;
  s.min_lr = tc.min_lr;
  s.decay_steps = tc.lr_decay_steps > 0 ? tc.lr_decay_steps : tc.steps;
  s.warmup = tc.lr_warmup_fraction > 0
                 ? static_cast<int>(std::lround(tc.lr_warmup_fraction * s.decay_steps))
                 : tc.warmup_steps;
  s.decay = *ParseLrDecay(tc.lr_decay_style);
  return s;
}

// What resuming at `step` needs besides the tensors, as JSON for the checkpoint's attributes:
// the training samples consumed before `step` (where the epoch sampler goes on; random windows
// are drawn per step from the seed; hidden dropout's masks follow from the samples). The LR and
// exit-loss weights follow their schedules; they are here for people and tools.
std::string TrainStateJson(const RunConfig& rc, int step, int64_t samples) {
  const TrainConfig& tc = rc.train;
  std::string weights;
  for (float w : ExitLossWeights(rc.model, step)) {
    absl::StrAppend(&weights, weights.empty() ? "" : ", ", absl::StrFormat("%.9g", w));
  }
  return absl::StrFormat(
      "{\"step\": %d, \"data\": {\"sampler\": \"%s\", \"seed\": %d, \"consumed_samples\": %d}, "
      "\"lr\": %.9g, \"exit_loss_weights\": [%s]}",
      step, tc.sampling == "epochs" ? "epochs" : "random_rows", tc.seed, samples,
      LearningRate(step, LrScheduleOf(tc)), weights);
}

// Set by SIGTERM when the run asked for it (train.exit_signal_handler).
volatile std::sig_atomic_t g_sigterm = 0;
void OnSigterm(int) { g_sigterm = 1; }
// Takes SIGTERM for the run's lifetime (when asked), then gives it back to the default action.
struct SigtermGuard {
  explicit SigtermGuard(bool take) : taken(take) {
    g_sigterm = 0;
    if (taken) previous = std::signal(SIGTERM, OnSigterm);
  }
  ~SigtermGuard() {
    if (taken) std::signal(SIGTERM, previous == SIG_ERR ? SIG_DFL : previous);
  }
  bool taken;
  void (*previous)(int) = SIG_DFL;
};

// `final_computed`: false when EE-Tuning stops at its deepest exit (the final head does not run).
std::string FormatLosses(const ModelConfig& c, double final_loss, const std::vector<double>& exits,
                         bool final_computed = true) {
  std::string s = final_computed ? absl::StrFormat("final %.4f", final_loss) : "final -";
  for (size_t i = 0; i < exits.size(); ++i) {
    absl::StrAppendFormat(&s, " %s %.4f", ExitName(c, i), exits[i]);
  }
  return s;
}

}  // namespace

int SplitDepth(const RunConfig& rc) {
  return rc.train.skip_layers_past_exits ? Model::DeepestExitDepth(rc.model) : rc.model.num_layers;
}

int MicrobatchesPerStep(const TrainConfig& t) {
  const int rows = t.dp > 0 ? t.batch_size / t.dp : 0;
  const int micro = t.micro_batch_size > 0 ? t.micro_batch_size : rows;
  return micro > 0 ? rows / micro : 0;
}

absl::Status ValidateLayout(const RunConfig& rc) {
  const ModelConfig& m = rc.model;
  const TrainConfig& t = rc.train;
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (t.tp < 1 || t.pp < 1 || t.dp < 1) {
    return bad("parallel sizes must be >= 1, got tp ", t.tp, ", pp ", t.pp, ", dp ", t.dp);
  }
  if (t.virtual_stages < 1) {
    return bad("virtual_stages must be >= 1, got ", t.virtual_stages);
  }
  if (t.skip_layers_past_exits) {
    if (!t.freeze_backbone) {
      return bad("skip_layers_past_exits is for EE-Tuning: it needs freeze_backbone");
    }
    if (Model::DeepestExitDepth(m) < 1) {
      return bad("skip_layers_past_exits: the model has no exit after a layer");
    }
  }
  // The layers the pipeline stages split.
  const int split = SplitDepth(rc);
  const std::string layers = split == m.num_layers
                                 ? absl::StrCat("num_layers ", split)
                                 : absl::StrCat("the ", split, " layers up to the deepest exit");
  if (split % t.pp != 0) {
    return bad(layers, " does not divide into pp ", t.pp, " pipeline stages");
  }
  if (split % (t.pp * t.virtual_stages) != 0) {
    return bad(layers, " does not divide into pp ", t.pp, " x virtual_stages ", t.virtual_stages,
               " = ", t.pp * t.virtual_stages, " model chunks");
  }
  if (m.num_heads % t.tp != 0) {
    return bad("num_heads ", m.num_heads, " is not divisible by tp ", t.tp);
  }
  if (m.num_kv_heads % t.tp != 0 && t.tp % m.num_kv_heads != 0) {
    return bad("num_kv_heads ", m.num_kv_heads, " neither divides nor is divisible by tp ", t.tp);
  }
  if (m.vocab_size % t.tp != 0) {
    return bad("vocab_size ", m.vocab_size, " is not divisible by tp ", t.tp,
               " (pad the vocabulary)");
  }
  if (m.ffn_hidden_size % t.tp != 0) {
    return bad("ffn_hidden_size ", m.ffn_hidden_size, " is not divisible by tp ", t.tp);
  }
  if (t.batch_size % t.dp != 0) {
    return bad("batch_size ", t.batch_size, " is not divisible by dp ", t.dp);
  }
  const int rows = t.batch_size / t.dp;
  if (t.micro_batch_size < 0 || (t.micro_batch_size > 0 && rows % t.micro_batch_size != 0)) {
    return bad("micro_batch_size ", t.micro_batch_size, " does not divide the ", rows,
               " sequences of each data-parallel rank (batch_size ", t.batch_size, " / dp ", t.dp,
               ")");
  }
  if (t.virtual_stages > 1) {
    const int micro = t.micro_batch_size > 0 ? t.micro_batch_size : rows;
    const int microbatches = MicrobatchesPerStep(t);
    if (microbatches % t.pp != 0) {
      return bad("interleaved pipeline (virtual_stages ", t.virtual_stages, ") needs the ",
                 microbatches, " microbatches per step (", rows, " sequences / micro_batch_size ",
                 micro, ") to be a multiple of pp ", t.pp);
    }
  }
  if (t.sequence_parallel && t.tp > 1) {
    const int micro = t.micro_batch_size > 0 ? t.micro_batch_size : rows;
    if (micro * t.seq_len % t.tp != 0) {
      return bad("sequence_parallel splits each microbatch's micro_batch_size ", micro,
                 " x seq_len ", t.seq_len, " = ", micro * t.seq_len, " rows over tp ", t.tp,
                 ": not divisible");
    }
    if (static_cast<int64_t>(micro) * t.seq_len / t.tp * m.hidden_size % 2 != 0) {
      return bad("sequence_parallel: each rank's ", micro * t.seq_len / t.tp,
                 " rows x hidden_size ", m.hidden_size,
                 " must be even (bf16 blocks are gathered in pairs)");
    }
  }
  if (t.exit_placement != "bubbles" && t.exit_placement != "backward") {
    return bad("exit_placement \"", t.exit_placement, "\" is not bubbles or backward");
  }
  if (!(t.hidden_dropout >= 0 && t.hidden_dropout < 1)) {
    return bad("hidden_dropout must be in [0, 1), got ", t.hidden_dropout);
  }
  RETURN_IF_ERROR(ValidateTuneCache(t));
  if (t.sampling != "epochs" && t.sampling != "random") {
    return bad("sampling \"", t.sampling, "\" is not epochs or random");
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainSummary> RunTraining(const RunConfig& rc, const TrainOptions& opts) {
  const ModelConfig& mc = rc.model;
  const TrainConfig& tc = rc.train;
  RETURN_IF_ERROR(ValidateLayout(rc));
  std::unique_ptr<ParallelContext> single;
  ParallelContext* ctx = opts.ctx;
  if (ctx == nullptr) {
    single = ParallelContext::Single();
    ctx = single.get();
  }
  if (ctx->grid.tp() != tc.tp || ctx->grid.pp() != tc.pp || ctx->grid.dp() != tc.dp) {
    return absl::InvalidArgumentError(
        absl::StrCat("the run config asks for tp ", tc.tp, ", pp ", tc.pp, ", dp ", tc.dp, " but ",
                     ctx->grid.world(), " ranks were launched as tp ", ctx->grid.tp(), ", pp ",
                     ctx->grid.pp(), ", dp ", ctx->grid.dp()));
  }
  const bool rank0 = ctx->rank == 0;
  const bool verbose = opts.verbose && rank0;
  // From now on a SIGTERM stops the run after a step (exit_signal_handler).
  const SigtermGuard sigterm_guard(tc.exit_signal_handler);
  std::unique_ptr<Backend> own_backend;
  Backend* backend = opts.backend;
  if (backend == nullptr) {
    ASSIGN_OR_RETURN(own_backend, MakeBackend(tc.backend));
    backend = own_backend.get();
  }
  ASSIGN_OR_RETURN(auto tokenizer, MakeTokenizer(tc.tokenizer));
  if (tokenizer->vocab_size() > mc.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("model vocab_size ", mc.vocab_size, " is smaller than the ", tokenizer->name(),
                     " tokenizer's vocabulary ", tokenizer->vocab_size()));
  }
  ASSIGN_OR_RETURN(const TrainingData data, LoadTrainingData(tc, mc.vocab_size, verbose));
  const BlendedDataset& train = data.train;
  const TokenDataset& val = data.val;

  // This rank's model chunks: chunk k holds virtual stage k * pp + stage of pp * v (one chunk,
  // the pipeline stage itself, without interleaving).
  const int pp = tc.pp, nv = tc.virtual_stages;
  // EE-Tuning without the layers past the deepest exit: the model is cut there.
  const int cut = SplitDepth(rc) == mc.num_layers ? 0 : SplitDepth(rc);
  if (cut > 0 && opts.init_from.empty() && opts.resume.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "skip_layers_past_exits needs a checkpoint to start from (--init-from or --resume): "
        "saves copy layers ",
        cut + 1, "-", mc.num_layers, " and the final head from it"));
  }
  std::vector<std::unique_ptr<Model>> models;
  std::vector<Model*> chunks;
  for (int k = 0; k < nv; ++k) {
    ASSIGN_OR_RETURN(
        auto chunk,
        Model::Create(mc, backend, StageSpec{k * pp + ctx->coord.pp, pp * nv, cut},
                      TpSpec{ctx->coord.tp, tc.tp, ctx->tp.get(), tc.sequence_parallel},
                      tc.freeze_backbone ? ModelGradients::kExits : ModelGradients::kAll));
    chunk->InitRandom(tc.seed, tc.init_method_std);
    if (!models.empty()) chunk->ShareSpScratch(*models[0]);  // the chunks run one at a time
    chunk->set_hidden_dropout(tc.hidden_dropout, static_cast<uint64_t>(tc.seed));
    // Tensors every tensor-parallel rank holds whole count once in the gradient norm.
    if (ctx->coord.tp != 0) {
      for (ParamInfo& p : chunk->params().mutable_params()) {
        if (p.split_dim < 0 || ctx->coord.tp % p.tp_replicas != 0) p.count_in_norm = false;
      }
    }
    chunks.push_back(chunk.get());
    models.push_back(std::move(chunk));
  }
  Model* model = chunks[0];
  // Copies of the word embedding on later virtual stages (tied heads): their gradients are
  // summed over every copy (the chunks of this rank, then the ranks that hold one), and only
  // virtual stage 0's copy counts in the gradient norm.
  std::vector<int> emb_chunks;  // this rank's chunks holding a copy
  for (int k = 0; k < nv; ++k) {
    if (chunks[k]->word_embedding() >= 0) emb_chunks.push_back(k);
  }
  // The ranks holding a copy, split from this rank's pipeline group (collective over it): on the
  // pipeline group's communicator, so NCCL where the pipeline runs on NCCL (the gradient is a
  // vocabulary-sized device buffer, summed every step).
  std::unique_ptr<Communicator> embedding_group;
  {
    const std::vector<int> stages = ctx->grid.PpGroup(ctx->rank);  // pipeline-group rank order
    std::vector<int> group;                                        // ranks in the pipeline group
    for (size_t i = 0; i < stages.size(); ++i) {
      bool holds = false;
      for (int k = 0; k < nv; ++k) {
        holds |= Model::StageHasWordEmbedding(
            mc, StageSpec{k * pp + ctx->grid.CoordOf(stages[i]).pp, pp * nv, cut});
      }
      if (holds && !emb_chunks.empty()) group.push_back(static_cast<int>(i));
    }
    if (group.empty()) group = {ctx->pp->rank()};
    embedding_group = ctx->pp->Subgroup(group);
    for (int k : emb_chunks) {
      if (ctx->coord.pp != 0 || k != 0) {
        chunks[k]->params().mutable_params()[chunks[k]->word_embedding()].count_in_norm = false;
      }
    }
  }
  TrainSummary sum;
  for (Model* chunk : chunks) sum.num_params += static_cast<int64_t>(chunk->params().size());
  // EE-Tuning: the exits' own tensors train, every other one is frozen (the optimizer skips it
  // and leaves it out of the gradient norm). The exits are declared last, so the gradients (made
  // with the chunks) and the optimizer's moments cover only the arena's tail from the first exit
  // tensor on.
  int64_t trainable = sum.num_params;
  if (tc.freeze_backbone) {
    trainable = 0;
    for (Model* chunk : chunks) {
      for (const ParamInfo& p : chunk->params().params()) {
        if (p.trainable) trainable += static_cast<int64_t>(p.numel);
      }
    }
    std::vector<double> total = {static_cast<double>(trainable)};
    SumOverGroup(ctx->pp.get(), backend, total);
    if (total[0] == 0) {
      return absl::InvalidArgumentError(
          "freeze_backbone: the model has no exit parameters to train (exits tied to the word "
          "embedding with kind \"linear\" have none of their own)");
    }
    trainable = static_cast<int64_t>(total[0]);
  }
  for (Model* chunk : chunks) {
    sum.gradient_elements += static_cast<int64_t>(chunk->params().grad_size());
  }
  AdamWConfig ac;
  ac.beta1 = tc.beta1;
  ac.beta2 = tc.beta2;
  ac.weight_decay = tc.weight_decay;
  ac.grad_clip = tc.grad_clip;
  ac.eps = tc.adam_eps;
  const LrSchedule schedule = LrScheduleOf(tc);
  std::vector<std::unique_ptr<DistributedOptimizer>> dopts;
  for (Model* chunk : chunks) {
    dopts.push_back(std::make_unique<DistributedOptimizer>(
        &chunk->params(), ac, ctx, tc.zero1, static_cast<size_t>(tc.grad_bucket_size)));
  }
  DistributedOptimizer& dopt = *dopts[0];
  // Moment arenas for checkpoints, laid out as the gradient arena (ZeRO-1 shards are gathered
  // into them), per chunk.
  std::vector<Buffer> full_m(nv), full_v(nv);
  std::vector<float*> ckpt_m(nv), ckpt_v(nv);
  for (int k = 0; k < nv; ++k) {
    AdamW& opt = dopts[k]->adamw();
    if (dopt.zero1()) {
      const size_t bytes = chunks[k]->params().grad_size() * sizeof(float);
      full_m[k] = Buffer(backend, bytes);
      full_v[k] = Buffer(backend, bytes);
      // Zeros where a resume loads nothing (padding, frozen tensors), which the shards copy.
      backend->Fill(full_m[k].f32(), bytes / sizeof(float), 0.0f);
      backend->Fill(full_v[k].f32(), bytes / sizeof(float), 0.0f);
    }
    ckpt_m[k] = dopt.zero1() ? full_m[k].f32() : opt.m();
    ckpt_v[k] = dopt.zero1() ? full_v[k].f32() : opt.v();
  }
  auto shard = [&](int k) { return dopts[k]->adamw().hi() - dopts[k]->adamw().lo(); };
  // Where chunk k's optimizer shard starts in its checkpoint moment arena.
  auto shard_at = [&](int k) { return dopts[k]->adamw().lo() - chunks[k]->params().grad_lo(); };
  // What this rank saves and loads: its chunks, tensor-parallel blocks, moments. Tensors held
  // whole by every tensor-parallel rank are written by rank 0 of the group, copies of the word
  // embedding only by virtual stage 0, and data-parallel replicas write nothing.
  std::vector<ChunkState> states;
  for (int k = 0; k < nv; ++k) {
    states.push_back(ChunkStateFor(*chunks[k], ctx->coord.tp, tc.tp, ctx->coord.pp == 0 && k == 0,
                                   ckpt_m[k], ckpt_v[k]));
  }
  int start = 0;
  int64_t start_samples = 0;  // training samples consumed before step `start` (epoch sampler)
  if (!opts.resume.empty()) {
    ASSIGN_OR_RETURN(CheckpointMeta meta, ReadCheckpointMeta(opts.resume));
    if (auto it = meta.attrs.find("train_config"); it != meta.attrs.end() && verbose) {
      // Switching between EE-Tuning and full training on resume is allowed, but said.
      const nlohmann::json saved = nlohmann::json::parse(it->second, nullptr, false);
      if (saved.is_object() && saved.value("freeze_backbone", false) != tc.freeze_backbone) {
        std::fprintf(stderr, "note: %s was trained %s a frozen backbone; this run trains %s\n",
                     opts.resume.c_str(), tc.freeze_backbone ? "without" : "with",
                     tc.freeze_backbone
                         ? "the exits alone (and saves the other tensors' moments as zeros)"
                         : "every parameter; the backbone's Adam moments are zeros while the "
                           "step count goes on, so its first updates are larger than a fresh "
                           "optimizer's (up to 1.1x with beta2 0.95, 6.5x with 0.999; "
                           "--init-from restarts the optimizer instead)");
      }
      if (saved.is_object() && saved.value("seed", tc.seed) != tc.seed) {
        std::fprintf(stderr,
                     "note: %s was trained with seed %d; this run's seed %d draws another data "
                     "order from here on\n",
                     opts.resume.c_str(), saved.value("seed", tc.seed), tc.seed);
      }
      // (Checkpoints from before train.sampling drew random windows.)
      if (saved.is_object() && saved.value("sampling", "random") != tc.sampling) {
        std::fprintf(stderr,
                     "note: %s drew its batches with sampling \"%s\"; this run continues with "
                     "\"%s\"\n",
                     opts.resume.c_str(), saved.value("sampling", "random").c_str(),
                     tc.sampling.c_str());
      }
    }
    if (meta.config_json != rc.model_json) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", opts.resume, " was trained with a different model config than this run"));
    }
    start = static_cast<int>(meta.step);
    start_samples = ConsumedSamples(meta.attrs, start, tc.batch_size);
    if (start >= tc.steps) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint ", opts.resume, " is already at step ", start, " of ", tc.steps,
                       "; set steps (--steps) above ", start, " to train further"));
    }
    RETURN_IF_ERROR(LoadCheckpoint(opts.resume, states));
    for (int k = 0; k < nv; ++k) {
      AdamW& opt = dopts[k]->adamw();
      if (dopt.zero1()) {
        backend->Copy(opt.m(), ckpt_m[k] + shard_at(k), shard(k) * sizeof(float));
        backend->Copy(opt.v(), ckpt_v[k] + shard_at(k), shard(k) * sizeof(float));
      }
      opt.set_step(start);
    }
  }

  if (!opts.init_from.empty()) {
    if (!opts.resume.empty()) {
      return absl::InvalidArgumentError("give either a checkpoint to resume or one to init from");
    }
    ASSIGN_OR_RETURN(CheckpointMeta meta, ReadCheckpointMeta(opts.init_from));
    if (meta.config_json != rc.model_json) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", opts.init_from, " holds a model with config ", meta.config_json,
          ", not this run's ", rc.model_json, "; use the checkpoint's model config"));
    }
    std::vector<ChunkState> weights = states;  // the weights only: fresh optimizer, step 0
    for (ChunkState& st : weights) st.adam_m = st.adam_v = nullptr;
    RETURN_IF_ERROR(LoadCheckpoint(opts.init_from, weights));
  }

  const int rows = tc.batch_size / ctx->grid.dp();  // this rank's share of the global batch
  const int micro = tc.micro_batch_size > 0 ? tc.micro_batch_size : rows;
  PipelineExecutor exec(chunks, ctx, micro, tc.seq_len, MicrobatchesPerStep(tc),
                        tc.exit_placement == "bubbles");
  exec.set_frozen_backbone(tc.freeze_backbone);
  if (tc.eod_mask_loss) exec.set_eod_loss_mask(tokenizer->eos_id());
  // KV heads replicated over tensor-parallel ranks (tp > num_kv_heads): each rank's K/V
  // projection gradient covers only its own query heads, so the ranks sharing a KV head sum
  // theirs, as each layer finishes its last backward (before any data-parallel reduction).
  const int kv_replicas = tc.tp > 1 ? LocalConfig(mc, tc.tp).kv_replicas : 1;
  std::unique_ptr<Communicator> kv_group;
  if (kv_replicas > 1) {
    std::vector<int> group;
    const int first = ctx->coord.tp / kv_replicas * kv_replicas;
    for (int i = 0; i < kv_replicas; ++i) group.push_back(first + i);
    kv_group = ctx->tp->Subgroup(group);
  }
  // Tensors whole on every tensor-parallel rank whose gradient covers the rank's own heads (the q
  // and k norms' gains): the ranks sum theirs, at the same points.
  bool tp_partial = false;
  for (Model* chunk : chunks) {
    for (const ParamInfo& p : chunk->params().params()) tp_partial |= p.sum_grad_over_tp;
  }
  tp_partial = tp_partial && tc.tp > 1;
  auto sum_over_tp = [&](ParamStore& ps, const ParamInfo& p) {
    // Frozen tensors (EE-Tuning) have no gradient to sum.
    if (!p.trainable || p.offset < ps.grad_lo()) return;
    if (kv_group && p.tp_replicas > 1) {
      kv_group->AllReduce(ps.grad_at(p.offset), p.numel, ReduceOp::kSum);
    }
    if (tp_partial && p.sum_grad_over_tp) {
      ctx->tp->AllReduce(ps.grad_at(p.offset), p.numel, ReduceOp::kSum);
    }
  };
  if (tc.overlap_grad_reduce || kv_group || tp_partial) {
    // Data-parallel buckets start their all-reduce as the last backward finishes their layers.
    exec.set_grads_ready([&](int chunk, size_t lo, size_t hi) {
      ParamStore& ps = chunks[chunk]->params();
      for (const ParamInfo& p : ps.params()) {
        if (p.offset >= lo && p.offset + p.numel <= hi) sum_over_tp(ps, p);
      }
      if (tc.overlap_grad_reduce) dopts[chunk]->GradientsReady(lo, hi);
    });
  }
  const int n = rows * tc.seq_len;
  std::vector<int32_t> in(n), tg(n);
  std::string ckpt;  // the last step directory written
  // A cut model's saves copy the layers past the cut from the checkpoint the run started from,
  // then from its own last save.
  std::string rest_source;
  if (cut > 0) {
    ASSIGN_OR_RETURN(rest_source,
                     ResolveCheckpoint(opts.init_from.empty() ? opts.resume : opts.init_from));
  }
  auto save = [&](int step) -> absl::Status {
    if (dopt.zero1()) {  // collective: every rank takes part
      for (int k = 0; k < nv; ++k) {
        ctx->dp->AllGather(dopts[k]->adamw().m(), ckpt_m[k], shard(k));
        ctx->dp->AllGather(dopts[k]->adamw().v(), ckpt_v[k], shard(k));
      }
    }
    CheckpointMeta meta;
    meta.config_json = rc.model_json;
    meta.step = step;
    meta.attrs["train_config"] = TrainConfigToJson(tc);
    meta.attrs["tokenizer"] = tc.tokenizer;
    meta.attrs["train_state"] =
        TrainStateJson(rc, step, start_samples + int64_t{step - start} * tc.batch_size);
    const bool writes = ctx->coord.dp == 0;
    ShardedSaveOptions so{tc.keep_checkpoints, opts.fail_save_after, backend};
    if (cut > 0 && writes) {  // the writing ranks share the layers past the cut
      so.write_more = [&](const std::string& staging) {
        return WriteLayersPastDepth(staging, meta, mc, cut, rest_source, true,
                                    ctx->coord.pp * tc.tp + ctx->coord.tp, tc.pp * tc.tp);
      };
    }
    ASSIGN_OR_RETURN(
        ckpt,
        SaveShardedCheckpoint(tc.out, meta, writes ? states : std::vector<ChunkState>{},
                              writes ? absl::StrCat("tp", ctx->coord.tp, "_pp", ctx->coord.pp) : "",
                              *ctx->world, so));
    if (cut > 0) {  // its top-level file, named without asking the file system
      rest_source = (std::filesystem::path(ckpt) / kCheckpointTopFile).string();
    }
    if (verbose) std::printf("saved %s (step %d)\n", ckpt.c_str(), step);
    return absl::OkStatus();
  };
  if (verbose) {
    double padded = 0;
    for (Model* chunk : chunks) padded += static_cast<double>(chunk->params().padded_size());
    const std::string layers =
        cut > 0 ? absl::StrFormat("built: layers 1-%d of %d, no final head", cut, mc.num_layers)
                : absl::StrFormat("%d layers", mc.num_layers);
    std::printf("model: %s, %lld parameters (%.2f M), %s, hidden %d, %zu exits\n",
                mc.style == ModelStyle::kGpt ? "gpt" : "llama",
                static_cast<long long>(sum.num_params), sum.num_params / 1e6, layers.c_str(),
                mc.hidden_size, mc.exits.size());
    std::printf("data: %lld train / %lld val tokens; batch %d x %d = %d tokens/step; %d steps\n",
                static_cast<long long>(train.size()), static_cast<long long>(val.size()),
                tc.batch_size, tc.seq_len, tc.batch_size * tc.seq_len, tc.steps);
    std::printf("layout: %d ranks = tp %d x pp %d x dp %d%s\n", ctx->grid.world(), tc.tp, tc.pp,
                tc.dp, dopt.zero1() ? ", ZeRO-1 optimizer sharding" : "");
    if (tc.freeze_backbone) {
      PrintFrozenBackbone(mc, tc, trainable, sum.gradient_elements, padded, cut, rest_source);
    }
  }
  MetricsLog metrics;  // rank 0's <out>/metrics.jsonl and TensorBoard events
  if (rank0) {
    metrics = OpenRunMetrics(tc.metrics ? tc.out + "/metrics.jsonl" : "", tc.tensorboard_dir, start,
                             verbose);
  }
  if (verbose) std::printf("%s\n", SamplingSummary(train, tc, start, start_samples).c_str());
  const std::string cache_note =
      SetUpTuneCache(exec, train, tc, start, start_samples, *ctx, backend);
  if (verbose && !cache_note.empty()) std::printf("%s\n", cache_note.c_str());
  std::vector<int64_t> windows(exec.tune_cache() ? rows : 0);
  sum.first_eval =
      Evaluate(exec, mc, backend, val, tc.eval_batches, tc.batch_size, rows, tc.seq_len, *ctx);
  metrics.Eval(start, mc, sum.first_eval.final_loss, cut == 0, sum.first_eval.exit_losses);
  if (verbose) {
    std::printf(
        "eval step %d | val %s\n", start,
        FormatLosses(mc, sum.first_eval.final_loss, sum.first_eval.exit_losses, cut == 0).c_str());
  }

  Timer total, interval;
  int64_t interval_tokens = 0, total_tokens = 0;
  std::vector<double> acc(1 + mc.exits.size(), 0.0);
  int acc_n = 0;
  Progress progress(tc.steps - start);
  // Stopping early: the ranks agree after each step (one all-reduce of a flag) whether any ran
  // past train.exit_duration_mins or got a SIGTERM.
  const bool may_stop = tc.exit_duration_mins > 0 || tc.exit_signal_handler;
  int end_step = tc.steps;
  std::string stop_reason;
  for (int step = start; step < tc.steps; ++step) {
    const int64_t step_samples = start_samples + int64_t{step - start} * tc.batch_size;
    const int64_t first_row = int64_t{ctx->coord.dp} * rows;  // of the global batch
    TrainingRows(train, tc, step, step_samples, first_row, rows, in.data(), tg.data());
    exec.set_first_sample(step_samples + first_row);
    if (!windows.empty()) {
      train.EpochWindowIds(tc.seed, step_samples + first_row, rows, tc.seq_len, windows.data());
      exec.set_step_windows(windows);
    }
    for (Model* chunk : chunks) chunk->params().ZeroGrads();
    std::vector<float> w = ExitLossWeights(mc, step);
    LossReport r = exec.TrainStep(in.data(), tg.data(), w);
    if (kv_group || tp_partial) {
      // Block exits' K/V projections replicated over tensor-parallel ranks (and their q and k
      // norms; under sequence parallelism every norm, the final one too): summed here (the
      // layers' are summed as their layers finish). They sit above every layer in the arena, so
      // no data-parallel bucket holding them has started yet.
      for (Model* chunk : chunks) {
        ParamStore& ps = chunk->params();
        for (const ParamInfo& p : ps.params()) {
          if (p.name.rfind("layers.", 0) != 0) sum_over_tp(ps, p);
        }
      }
    }
    if (opts.print_timeline && step + 1 == tc.steps) {
      Timeline measured = GatherTimeline(exec.last_step_intervals(), *ctx, backend);
      if (verbose) PrintTimeline(measured, exec.step_schedule());
    }
    if (!tc.freeze_backbone && !emb_chunks.empty() &&
        (emb_chunks.size() > 1 || embedding_group->size() > 1)) {
      // Sum the copies' gradients: this rank's chunks into the first holder, then over the
      // ranks, then back into the other chunks.
      auto grad = [&](int k) { return chunks[k]->params().grad(chunks[k]->word_embedding()); };
      Model& first = *chunks[emb_chunks[0]];
      const size_t numel = first.params().params()[first.word_embedding()].numel;
      for (size_t i = 1; i < emb_chunks.size(); ++i) {
        backend->Add(grad(emb_chunks[0]), grad(emb_chunks[0]), grad(emb_chunks[i]), numel);
      }
      if (embedding_group->size() > 1) {
        embedding_group->AllReduce(grad(emb_chunks[0]), numel, ReduceOp::kSum);
      }
      for (size_t i = 1; i < emb_chunks.size(); ++i) {
        backend->Copy(grad(emb_chunks[i]), grad(emb_chunks[0]), numel * sizeof(float));
      }
    }
    if (!std::isfinite(r.objective)) {
      return absl::InternalError(
          absl::StrCat("loss is not finite at step ", step + 1, "; lower the learning rate"));
    }
    const float lr = static_cast<float>(LearningRate(step, schedule));
    double gnorm = 0;
    if (nv == 1) {
      gnorm = dopt.Step(lr);
    } else {
      // One optimizer per chunk, clipped by the norm over every chunk of every stage.
      double sq = 0;
      for (auto& d : dopts) sq += d->ReduceGradients();
      gnorm = std::sqrt(dopt.GlobalSquaredNorm(sq));
      for (auto& d : dopts) d->Apply(lr, gnorm);
    }
    interval_tokens += int64_t{n} * ctx->grid.dp();
    total_tokens += int64_t{n} * ctx->grid.dp();
    std::vector<double> losses = {r.final_loss};
    losses.insert(losses.end(), r.exit_losses.begin(), r.exit_losses.end());
    SumOverGroup(ctx->pp.get(), backend, losses);  // each head's loss lives on one stage
    SumOverGroup(ctx->dp.get(), backend, losses);
    for (double& l : losses) l /= ctx->grid.dp();
    if (opts.step_losses) opts.step_losses->push_back(losses);
    if (opts.step_grad_norms) opts.step_grad_norms->push_back(gnorm);
    for (size_t i = 0; i < losses.size(); ++i) acc[i] += losses[i];
    ++acc_n;
    if (step == start) sum.first_train_losses = losses;
    // Stopping early (exit_duration_mins, a SIGTERM): the ranks agree, and the step is then the
    // run's last (logged, not saved or evaluated twice).
    bool stop = false;
    if (may_stop && step + 1 < tc.steps) {
      const bool late = tc.exit_duration_mins > 0 && total.Seconds() > 60.0 * tc.exit_duration_mins;
      std::vector<double> flags = {late ? 1.0 : 0.0, g_sigterm ? 1.0 : 0.0};
      SumOverGroup(ctx->world.get(), backend, flags, ReduceOp::kMax);
      stop = flags[0] > 0 || flags[1] > 0;
      if (stop) {
        stop_reason = flags[1] > 0
                          ? "a SIGTERM"
                          : absl::StrFormat("exit_duration_mins %g", tc.exit_duration_mins);
      }
    }
    const bool last = step + 1 == tc.steps || stop;
    if ((step + 1) % tc.log_interval == 0 || last) {
      const double tps = interval_tokens / interval.Seconds();
      std::vector<double> avg(acc.size());
      for (size_t i = 0; i < acc.size(); ++i) avg[i] = acc[i] / acc_n;
      sum.last_train_losses = avg;
      const bool final_computed = !tc.freeze_backbone || exec.tune_computes_final_loss();
      metrics.Train(step + 1, mc, avg[0], final_computed,
                    std::vector<double>(avg.begin() + 1, avg.end()), lr, gnorm, tps);
      if (verbose) {
        std::vector<double> ex(avg.begin() + 1, avg.end());
        std::printf(
            "step %5d/%d | %s | lr %.2e | gnorm %.3f | %.0f tok/s | %s\n", step + 1, tc.steps,
            FormatLosses(mc, avg[0], ex, !tc.freeze_backbone || exec.tune_computes_final_loss())
                .c_str(),
            lr, gnorm, tps, progress.Line(step + 1 - start).c_str());
        std::fflush(stdout);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      acc_n = 0;
      interval_tokens = 0;
      interval.Reset();
    }
    if (tc.eval_interval > 0 && (step + 1) % tc.eval_interval == 0 && !last) {
      EvalResult e =
          Evaluate(exec, mc, backend, val, tc.eval_batches, tc.batch_size, rows, tc.seq_len, *ctx);
      metrics.Eval(step + 1, mc, e.final_loss, cut == 0, e.exit_losses);
      if (verbose) {
        std::printf("eval step %d | val %s\n", step + 1,
                    FormatLosses(mc, e.final_loss, e.exit_losses, cut == 0).c_str());
      }
    }
    if (tc.save_interval > 0 && (step + 1) % tc.save_interval == 0 && !last) {
      RETURN_IF_ERROR(save(step + 1));
    }
    if (stop) {
      end_step = step + 1;
      break;
    }
  }
  sum.seconds = total.Seconds();
  sum.steps_done = end_step - start;
  sum.tune_cached_steps = exec.cached_steps();
  sum.tokens_per_second = sum.seconds > 0 ? total_tokens / sum.seconds : 0;
  sum.last_eval =
      Evaluate(exec, mc, backend, val, tc.eval_batches, tc.batch_size, rows, tc.seq_len, *ctx);
  metrics.Eval(end_step, mc, sum.last_eval.final_loss, cut == 0, sum.last_eval.exit_losses);
  if (verbose) {
    std::printf(
        "eval step %d | val %s\n", end_step,
        FormatLosses(mc, sum.last_eval.final_loss, sum.last_eval.exit_losses, cut == 0).c_str());
    const std::string cached = exec.tune_cache()
                                   ? absl::StrFormat(" (%lld from the tune cache)",
                                                     static_cast<long long>(sum.tune_cached_steps))
                                   : "";
    std::printf("trained %d steps%s in %.1f s: %.0f tokens/s\n", sum.steps_done, cached.c_str(),
                sum.seconds, sum.tokens_per_second);
  }
  RETURN_IF_ERROR(save(end_step));
  if (verbose && end_step < tc.steps) {
    std::printf("stopped at step %d of %d after %s; continue with --resume=%s\n", end_step,
                tc.steps, stop_reason.c_str(), tc.out.c_str());
  }
  if (opts.final_params && rank0) {
    // The whole model, as a single rank would hold it, read back from what was saved.
    ASSIGN_OR_RETURN(auto whole, Model::Create(mc, backend, StageSpec{0, 1}, TpSpec{}));
    RETURN_IF_ERROR(LoadCheckpoint(ckpt, whole->params()));
    const ParamStore& wp = whole->params();
    opts.final_params->resize(wp.size());
    backend->CopyToHost(opts.final_params->data(), wp.params_data(), wp.size() * sizeof(float));
  }
  sum.checkpoint = ckpt;
  for (auto& d : dopts) sum.early_buckets += d->early_buckets();
  return sum;
}

}  // namespace eellm
