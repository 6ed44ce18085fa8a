#include "launch/trainer.h"

#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoints/hdf5_checkpoint.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"
#include "engine/optim/adamw.h"
#include "engine/optim/schedules.h"
#include "launch/progress.h"
#include "models/exit_loss_weights.h"
#include "models/token_dataset.h"
#include "models/tokenizer.h"
#include "models/transformer.h"

namespace eellm {
namespace {

EvalResult Evaluate(Model& model, Workspace& ws, const TokenDataset& val, int max_batches) {
  const ModelConfig& c = model.config();
  const int n = ws.b * ws.t;
  std::vector<int32_t> in(n), tg(n);
  std::vector<float> w(c.exits.size(), 0.0f);
  EvalResult e;
  e.exit_losses.assign(c.exits.size(), 0.0);
  const int64_t batches = std::min<int64_t>(max_batches, val.NumSequentialBatches(ws.b, ws.t));
  for (int64_t i = 0; i < batches; ++i) {
    val.SequentialBatch(i, ws.b, ws.t, in.data(), tg.data());
    LossReport r = model.ForwardBackward(ws, in.data(), tg.data(), nullptr, w, false);
    e.final_loss += r.final_loss / batches;
    for (size_t k = 0; k < c.exits.size(); ++k) e.exit_losses[k] += r.exit_losses[k] / batches;
  }
  return e;
}

std::string FormatLosses(const ModelConfig& c, double final_loss,
                         const std::vector<double>& exits) {
  std::string s = absl::StrFormat("final %.4f", final_loss);
  for (size_t i = 0; i < exits.size(); ++i) {
    absl::StrAppendFormat(&s, " %s %.4f", ExitName(c, i), exits[i]);
  }
  return s;
}

}  // namespace

absl::StatusOr<TrainSummary> RunTraining(const RunConfig& rc, const TrainOptions& opts) {
  const ModelConfig& mc = rc.model;
  const TrainConfig& tc = rc.train;
  ASSIGN_OR_RETURN(auto backend, MakeBackend(tc.backend));
  ASSIGN_OR_RETURN(auto tokenizer, MakeTokenizer(tc.tokenizer));
  if (tokenizer->vocab_size() > mc.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("model vocab_size ", mc.vocab_size, " is smaller than the ", tokenizer->name(),
                     " tokenizer's vocabulary ", tokenizer->vocab_size()));
  }
  ASSIGN_OR_RETURN(TokenDataset train, TokenDataset::Load(tc.data + ".train.bin"));
  ASSIGN_OR_RETURN(TokenDataset val, TokenDataset::Load(tc.data + ".val.bin"));
  RETURN_IF_ERROR(train.Validate(tc.seq_len));
  RETURN_IF_ERROR(val.Validate(tc.seq_len));
  if (val.NumSequentialBatches(tc.batch_size, tc.seq_len) < 1) {
    // Evaluate() would average over zero batches and report a loss of 0.
    return absl::InvalidArgumentError(
        absl::StrCat("validation data ", tc.data, ".val.bin has ", val.size(),
                     " tokens, too few for one evaluation batch of ", tc.batch_size, " x ",
                     tc.seq_len, " (needs at least ", int64_t{tc.batch_size} * tc.seq_len + 1,
                     "); raise --val_fraction in `eellm data` or lower batch_size or seq_len"));
  }
  for (const TokenDataset* d : {&train, &val}) {
    for (int32_t t : d->tokens()) {
      if (t >= mc.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", t, " in ", tc.data, " is outside the model vocab_size ", mc.vocab_size));
      }
    }
  }

  ASSIGN_OR_RETURN(auto model, Model::Create(mc, backend.get()));
  model->InitRandom(tc.seed);
  AdamWConfig ac;
  ac.beta1 = tc.beta1;
  ac.beta2 = tc.beta2;
  ac.weight_decay = tc.weight_decay;
  ac.grad_clip = tc.grad_clip;
  AdamW opt(&model->params(), ac);
  int start = 0;
  if (!opts.resume.empty()) {
    ASSIGN_OR_RETURN(CheckpointMeta meta, ReadCheckpointMeta(opts.resume));
    if (meta.config_json != rc.model_json) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", opts.resume, " was trained with a different model config than this run"));
    }
    RETURN_IF_ERROR(LoadCheckpoint(opts.resume, model->params(), opt.m(), opt.v()));
    start = static_cast<int>(meta.step);
    if (start >= tc.steps) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint ", opts.resume, " is already at step ", start, " of ", tc.steps,
                       "; set steps (--steps) above ", start, " to train further"));
    }
    opt.set_step(start);
  }

  TrainSummary sum;
  sum.num_params = static_cast<int64_t>(model->params().size());
  auto ws = model->MakeWorkspace(tc.batch_size, tc.seq_len);
  const int n = tc.batch_size * tc.seq_len;
  std::vector<int32_t> in(n), tg(n);
  const std::string ckpt = tc.out + "/checkpoint.h5";
  auto save = [&](int step) -> absl::Status {
    CheckpointMeta meta;
    meta.config_json = rc.model_json;
    meta.step = step;
    meta.attrs["train_config"] = TrainConfigToJson(tc);
    meta.attrs["tokenizer"] = tc.tokenizer;
    RETURN_IF_ERROR(SaveCheckpoint(ckpt, model->params(), meta, opt.m(), opt.v()));
    if (opts.verbose) std::printf("saved %s (step %d)\n", ckpt.c_str(), step);
    return absl::OkStatus();
  };
  if (opts.verbose) {
    std::printf("model: %s, %lld parameters (%.2f M), %d layers, hidden %d, %zu exits\n",
                mc.style == ModelStyle::kGpt ? "gpt" : "llama",
                static_cast<long long>(sum.num_params), sum.num_params / 1e6, mc.num_layers,
                mc.hidden_size, mc.exits.size());
    std::printf("data: %lld train / %lld val tokens; batch %d x %d = %d tokens/step; %d steps\n",
                static_cast<long long>(train.size()), static_cast<long long>(val.size()),
                tc.batch_size, tc.seq_len, n, tc.steps);
  }
  sum.first_eval = Evaluate(*model, *ws, val, tc.eval_batches);
  if (opts.verbose) {
    std::printf("eval step %d | val %s\n", start,
                FormatLosses(mc, sum.first_eval.final_loss, sum.first_eval.exit_losses).c_str());
  }

  Timer total, interval;
  int64_t interval_tokens = 0, total_tokens = 0;
  std::vector<double> acc(1 + mc.exits.size(), 0.0);
  int acc_n = 0;
  Progress progress(tc.steps - start);
  for (int step = start; step < tc.steps; ++step) {
    train.RandomBatch(tc.seed, step, tc.batch_size, tc.seq_len, in.data(), tg.data());
    model->params().ZeroGrads();
    std::vector<float> w = ExitLossWeights(mc, step);
    LossReport r = model->ForwardBackward(*ws, in.data(), tg.data(), nullptr, w, true);
    if (!std::isfinite(r.objective)) {
      return absl::InternalError(
          absl::StrCat("loss is not finite at step ", step + 1, "; lower the learning rate"));
    }
    const float lr =
        static_cast<float>(WarmupCosineLr(step, tc.warmup_steps, tc.steps, tc.lr, tc.min_lr));
    const double gnorm = opt.Step(lr);
    interval_tokens += n;
    total_tokens += n;
    acc[0] += r.final_loss;
    for (size_t i = 0; i < r.exit_losses.size(); ++i) acc[1 + i] += r.exit_losses[i];
    ++acc_n;
    if (step == start) {
      sum.first_train_losses = {r.final_loss};
      for (double e : r.exit_losses) sum.first_train_losses.push_back(e);
    }
    const bool last = step + 1 == tc.steps;
    if ((step + 1) % tc.log_interval == 0 || last) {
      const double tps = interval_tokens / interval.Seconds();
      std::vector<double> avg(acc.size());
      for (size_t i = 0; i < acc.size(); ++i) avg[i] = acc[i] / acc_n;
      sum.last_train_losses = avg;
      if (opts.verbose) {
        std::vector<double> ex(avg.begin() + 1, avg.end());
        std::printf("step %5d/%d | %s | lr %.2e | gnorm %.3f | %.0f tok/s | %s\n", step + 1,
                    tc.steps, FormatLosses(mc, avg[0], ex).c_str(), lr, gnorm, tps,
                    progress.Line(step + 1 - start).c_str());
        std::fflush(stdout);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      acc_n = 0;
      interval_tokens = 0;
      interval.Reset();
    }
    if (tc.eval_interval > 0 && (step + 1) % tc.eval_interval == 0 && !last) {
      EvalResult e = Evaluate(*model, *ws, val, tc.eval_batches);
      if (opts.verbose) {
        std::printf("eval step %d | val %s\n", step + 1,
                    FormatLosses(mc, e.final_loss, e.exit_losses).c_str());
      }
    }
    if (tc.save_interval > 0 && (step + 1) % tc.save_interval == 0 && !last) {
      RETURN_IF_ERROR(save(step + 1));
    }
  }
  sum.seconds = total.Seconds();
  sum.steps_done = tc.steps - start;
  sum.tokens_per_second = sum.seconds > 0 ? total_tokens / sum.seconds : 0;
  sum.last_eval = Evaluate(*model, *ws, val, tc.eval_batches);
  if (opts.verbose) {
    std::printf("eval step %d | val %s\n", tc.steps,
                FormatLosses(mc, sum.last_eval.final_loss, sum.last_eval.exit_losses).c_str());
    std::printf("trained %d steps in %.1f s: %.0f tokens/s\n", sum.steps_done, sum.seconds,
                sum.tokens_per_second);
  }
  RETURN_IF_ERROR(save(tc.steps));
  sum.checkpoint = ckpt;
  return sum;
}

}  // namespace eellm
