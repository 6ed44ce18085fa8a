// TrainConfig: the "train" section of a run config (data, batch, optimizer, schedule,
// evaluation, checkpointing), parsed from JSON with every error naming the bad key or value.
// A run config file is {"model": {...ModelConfig...}, "train": {...TrainConfig...}}.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "models/model_config.h"

namespace eellm {

struct TrainConfig {
  // Token files <data>.train.bin and <data>.val.bin (`eellm data`), or a Megatron dataset
  // prefix (<data>.bin and <data>.idx, models/megatron_data.h) whose last val_fraction of tokens
  // (from a document's start) validates.
  std::string data = "data/kjv";
  float val_fraction = 0.01f;
  std::string tokenizer = "byte";
  std::string backend = "cpu";
  std::string out = "runs/default";  // checkpoint directory (<out>/latest, <out>/step_*/)
  int batch_size = 8;                // global batch (sequences per optimizer step)
  // How training batches draw their sequences: "epochs" (as Megatron: every window of seq_len + 1
  // tokens once per epoch, in a fresh order each epoch; models/epoch_sampler.h) or "random"
  // (windows at uniformly random offsets, with replacement: eellm's sampler before epochs).
  std::string sampling = "epochs";
  // Megatron's --hidden-dropout (its default is 0.1, which EE-LLM's recipes keep): training
  // passes drop each attention and MLP output (layers and exits) and the embedding with this
  // probability; 0 = none. (--attention-dropout is not implemented.)
  float hidden_dropout = 0.0f;
  int micro_batch_size = 0;  // sequences per microbatch; 0 = batch_size / dp (one microbatch)
  int seq_len = 128;
  int steps = 1000;
  float lr = 1e-3f;
  float min_lr = 1e-4f;
  int warmup_steps = 50;
  float weight_decay = 0.1f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float adam_eps = 1e-8f;
  // Megatron's --lr-decay-style (cosine, linear, constant, inverse-square-root) and
  // --lr-decay-iters (0: steps): the decay after the warm-up reaches min_lr at that step.
  std::string lr_decay_style = "cosine";
  int lr_decay_steps = 0;
  // Megatron's --lr-warmup-fraction (EE-LLM's tuning scripts use .01): the warm-up takes this
  // fraction of the decay's steps (lr_decay_steps, or steps) instead of warmup_steps; 0 = off.
  float lr_warmup_fraction = 0.0f;
  float init_method_std = 0.02f;  // N(0, std) initial weights of a fresh run
  bool metrics = true;            // append progress to <out>/metrics.jsonl (launch/metrics_log.h)
  // Megatron's --tensorboard-dir: the same values as TensorBoard scalars in an event file there
  // ("" = none; launch/tensorboard_events.h).
  std::string tensorboard_dir;
  float grad_clip = 1.0f;
  int seed = 1234;
  int log_interval = 10;
  int eval_interval = 200;  // 0 = only at the end
  int eval_batches = 8;
  int save_interval = 0;     // 0 = only at the end
  int keep_checkpoints = 3;  // step directories kept in `out` (0 = all)
  // Stopping early with a checkpoint (Megatron's --exit-duration-in-mins and
  // --exit-signal-handler): after the first step that ends past this many minutes of training
  // (0 = never), or after a SIGTERM reached any rank, every rank saves and the run ends; resume
  // with --resume.
  float exit_duration_mins = 0;
  bool exit_signal_handler = false;
  int tp = 1, pp = 1, dp = 1;  // parallel layout (world size = tp * pp * dp)
  bool zero1 = false;          // shard optimizer state over data-parallel ranks
  // Megatron's --sequence-parallel (with tp > 1): between the tensor-parallel branches each rank
  // holds 1/tp of the rows (norms, residual stream, exits' inputs); models/sequence_parallel.h.
  bool sequence_parallel = false;
  // Data-parallel gradient all-reduce in buckets of this many elements, each started as soon
  // as the last backward has finished its layers (overlap_grad_reduce) or after the backward.
  int grad_bucket_size = 1 << 20;
  bool overlap_grad_reduce = true;
  // Where exit-head work runs: "bubbles" (its own action in pipeline bubbles) or "backward"
  // (fused into the backward slot of its layer, EE-LLM's default).
  std::string exit_placement = "bubbles";
  // Communicators of multi-process runs: "auto" (NCCL for the tensor- and data-parallel groups
  // when the backend is a GPU and eellm was built with NCCL, else MPI), "nccl" (that, or an
  // error), "mpi" (MPI for every group; device buffers staged through host memory).
  std::string communicator = "auto";
  // Interleaved pipeline parallelism: model chunks per pipeline rank (virtual stages; chunk c of
  // rank s holds virtual stage c * pp + s of pp * virtual_stages). 1 = plain 1F1B.
  int virtual_stages = 1;
  // EE-Tuning: train only the exits' own parameters (norms, MLPs, blocks and untied heads of
  // "exits"); every other parameter is frozen, the backbone runs forward only and no gradient
  // crosses pipeline stages. Usually with --init-from a converted model with added exits.
  bool freeze_backbone = false;
  // EE-Tuning at scale (with freeze_backbone): build and load only the layers up to the deepest
  // exit, without the final norm and head; the pipeline stages split those layers. Needs a
  // checkpoint to start from (--init-from or --resume): saves copy the layers past the deepest
  // exit and the final head from it (then from the run's own last save), so checkpoints stay
  // whole. Validation then reports the exits alone.
  bool skip_layers_past_exits = false;
  // EE-Tuning's hidden-state cache (with freeze_backbone and epoch sampling): up to this many MiB
  // of host memory per rank keep what the frozen backbone gives the exits for every training
  // window, so that the steps after the first epoch skip the backbone. Used when every window
  // fits (the run says what that takes) and the run passes one epoch; 0 = off.
  int tune_cache_mb = 0;
  // Megatron's --eod-mask-loss: no loss (final head and exits) at positions whose input token is
  // the tokenizer's end-of-text, so the first token of a document is not predicted from the end
  // of the one before it. Validation masks them too.
  bool eod_mask_loss = false;
};

struct RunConfig {
  ModelConfig model;
  TrainConfig train;
  std::string model_json;  // canonical model JSON (stored in checkpoints)
};

absl::StatusOr<RunConfig> ParseRunConfig(const std::string& json_text);
absl::StatusOr<RunConfig> LoadRunConfig(const std::string& path);
std::string TrainConfigToJson(const TrainConfig& t);

}  // namespace eellm
