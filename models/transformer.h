// The early-exit decoder-only transformer: parameters (one arena), initialisation, and the
// training/evaluation pass with the final head and every exit head. Exit heads run in the
// backward slot of their layer (as EE-LLM does), so exit logits are never stored: the head's
// forward, loss and backward happen together and their input gradient joins the backbone's.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/core/status.h"
#include "engine/tensor/param_store.h"
#include "models/layers.h"
#include "models/loss_log.h"
#include "models/model_config.h"
#include "parallel/tensor_parallel.h"

namespace eellm {

struct ExitHeadParams {
  MlpParams mlp;      // kind mlp
  BlockParams block;  // kind block
  NormParams norm;    // kinds norm, mlp, block
  int head = -1;      // untied output projection [vocab, hidden]; -1 when tied
};

struct ExitActs {
  MlpActs mlp;
  float* mlp_out = nullptr;  // [n, c]
  BlockActs block;
  NormActs norm;
};

// Per-batch buffers for one microbatch of b sequences of t tokens, allocated once.
struct Workspace {
  explicit Workspace(Backend* be) : arena(be) {}
  int b = 0, t = 0;
  Arena arena;
  int32_t *ids, *targets, *pos;
  float* weights;  // [n] per-token loss weights
  float* x0;       // [n, c] embedding output
  std::vector<BlockActs> layers;
  NormActs final_norm;
  std::vector<ExitActs> exits;
  float *losses, *max_prob;  // [n], [n] (the logits themselves are the Model's, shared)
  GradScratch gs;
  float *dx, *dx_prev, *d_h_extra, *dhidden, *dexit;  // [n, c] each
  // Exit work run ahead of the backward (StageExitHeads): per local exit, the gradient of its
  // loss w.r.t. the hidden state it reads [n, c], added when the backward reaches it.
  std::vector<float*> exit_grad;
  bool exits_done = false;
  // Hidden dropout (Model::set_hidden_dropout): the global number of the pass's first row (its
  // sample's index times t; the executor sets it for training passes). -1: no dropout.
  int64_t dropout_row0 = -1;
  std::vector<float> host_mask, host_losses, host_max_prob, host_weights;
  std::vector<float> host_scaled_weights;               // host_weights / an exit's temperature
  std::unique_ptr<VocabParallelCrossEntropy> vocab_ce;  // tensor parallelism only
};

// Which part of the model a rank holds: pipeline stage `stage` of `stages` owns layers
// [stage * D / stages, (stage + 1) * D / stages) of the D = `depth` layers the stages split, the
// embedding (stage 0), the final norm and output head (last stage, when D is every layer) and
// the exits on its layers (an exit belongs to the stage of its layer; with D short of every
// layer, an exit reading depth D belongs to the last stage). Stages with tied heads (the last
// stage with tied embeddings, stages with tied exits) hold a copy of the word embedding whose
// gradient the trainer sums across stages.
struct StageSpec {
  int stage = 0;
  int stages = 1;
  // 0: every layer. Else the model stops after layer `depth` (at least the deepest exit's):
  // EE-Tuning without building or loading the layers it never runs, nor the final head.
  int depth = 0;
};

// The gradients a Model holds: every parameter's (training); the exits' (EE-Tuning's frozen
// backbone: only the exits' own tensors are trainable, and gradients exist for the arena's tail
// from the first of them on, ParamStore::KeepGradientsFrom); none (inference, and copying
// checkpoints).
enum class ModelGradients { kAll, kExits, kNone };

class Model {
 public:
  // `tp`: this rank's tensor-parallel share (heads, FFN columns and vocabulary split over the
  // group; parameters are the local shards, ParamInfo::split_dim says along which dimension).
  // `grads`: which gradients the model holds (see ModelGradients).
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config, Backend* be,
                                                       StageSpec stage = {}, TpSpec tp = {},
                                                       ModelGradients grads = ModelGradients::kAll);

  const ModelConfig& config() const { return config_; }
  ParamStore& params() { return params_; }
  Backend* backend() const { return be_; }
  LayerContext ctx() { return LayerContext{be_, &local_, &params_, tp_, &sp_->scratch}; }
  // Rows of the residual stream this rank holds of a batch of n (n / tp under sequence
  // parallelism): the rows of StageOutput, StageInputGrad and the stage's input.
  // Sequence parallelism: use `other`'s whole-row scratch (model chunks of one rank, which run
  // one at a time) instead of one of this model's own. Before making workspaces.
  void ShareSpScratch(const Model& other) { sp_ = other.sp_; }
  int ResidualRows(int n) const { return tp_.sequence_parallel && tp_.size > 1 ? n / tp_.size : n; }
  const ModelConfig& local_config() const { return local_; }  // this tensor-parallel rank's
  const TpSpec& tp() const { return tp_; }
  // This rank's vocabulary rows (all of them without tensor parallelism).
  VocabShard vocab_shard() const { return ShardOfVocab(config_.vocab_size, tp_.rank, tp_.size); }

  // GPT-2 (and Megatron) initialisation: N(0, std) weights (--init-method-std, 0.02), residual
  // output projections scaled by 1/sqrt(2 * num_layers), zero biases, unit norm gains. Each
  // tensor's values depend only on `seed` and its global name, so every pipeline layout starts
  // from the same weights.
  void InitRandom(uint64_t seed, float std = 0.02f);

  std::unique_ptr<Workspace> MakeWorkspace(int b, int t);

  // Megatron's --hidden-dropout: in passes whose workspace has a dropout_row0 (training), every
  // branch output (attention and MLP, of layers and exits) is dropped with probability p before
  // its residual add, and the embedding output too; masks follow from (`seed`, layer or exit,
  // global row, column) alone (engine/core/dropout.h), so every layout drops the same elements.
  // Before making workspaces.
  void set_hidden_dropout(float p, uint64_t seed) {
    EE_CHECK(p >= 0 && p < 1, "hidden dropout ", p, " outside [0, 1)");
    hidden_dropout_ = p;
    dropout_seed_ = seed;
  }
  float hidden_dropout() const { return hidden_dropout_; }

  // One pass over a batch on a single-stage model: ids, targets [b*t] and optional loss mask
  // (host arrays). Always computes every loss; when `backward` is true, accumulates gradients
  // of loss_scale * (final loss + sum_i exit_weights[i] * exit loss_i) into params().grads.
  LossReport ForwardBackward(Workspace& ws, const int32_t* ids, const int32_t* targets,
                             const float* mask, absl::Span<const float> exit_weights, bool backward,
                             float loss_scale = 1.0f);

  // ---- pipeline stages ----------------------------------------------------------------------
  // Forward of this stage's layers: from `ids` (host, first stage) or from the previous stage's
  // hidden states `input` [b*t, c] (device).
  void StageForward(Workspace& ws, const int32_t* ids, const float* input);
  // Hidden states to send to the next stage [b*t, c].
  const float* StageOutput(const Workspace& ws) const;
  // StageForward stops after layer `depth` (a depth of the whole model; -1: the stage's last
  // layer), as EE-Tuning needs no layer past its deepest exit; StageTuneExits then computes no
  // final head. Not with StageBackward.
  void set_forward_end(int depth) { forward_end_ = depth; }
  int ForwardEnd() const;
  // The deepest layer an exit reads (the depth of the deepest exit): what EE-Tuning computes.
  static int DeepestExitDepth(const ModelConfig& c);
  // Of `stages` equal (virtual) pipeline stages over `depth` layers (0: all), the stage that holds
  // exit `i`, and the last that holds an exit (0 without exits).
  static int ExitStage(const ModelConfig& c, int i, int stages, int depth = 0);
  static int LastStageWithExit(const ModelConfig& c, int stages, int depth = 0);
  // Heads of this stage (final head on the last stage, local exits) and, when `backward`, the
  // backward of its layers given the next stage's gradient `d_output` (device; null on the last
  // stage). Losses of heads on other stages are reported as 0.
  LossReport StageBackward(Workspace& ws, const int32_t* targets, const float* mask,
                           absl::Span<const float> exit_weights, bool backward,
                           const float* d_output, float loss_scale);
  // The stage's exit heads for a microbatch whose forward has run: their forward, loss and
  // backward now (exit parameter gradients accumulate), with the gradients w.r.t. the hidden
  // states stored in the workspace; the following StageBackward adds them at the exits' layers
  // instead of running the exits again. Lets a pipeline schedule put exit work into bubbles.
  LossReport StageExitHeads(Workspace& ws, const int32_t* targets, const float* mask,
                            absl::Span<const float> exit_weights, float loss_scale);
  // EE-Tuning (frozen backbone), after StageForward: the stage's exits' losses with their
  // backward into the exits' parameters only (no gradient reaches the backbone or leaves the
  // stage), and on the last stage the final head's loss without a backward. The objective
  // counts the exits' weighted losses alone.
  LossReport StageTuneExits(Workspace& ws, const int32_t* targets, const float* mask,
                            absl::Span<const float> exit_weights, float loss_scale);
  // What StageTuneExits reads of StageForward's work: the rows [b * t, hidden] of each distinct
  // hidden state the stage's exits take (a layer's output or input, or the attention residual of
  // a post MLP exit's layer), then the stage's output when it computes the final head's loss
  // (after set_forward_end). Writing these rows stands in for the forward (the hidden-state
  // cache of EE-Tuning, models/tune_input_cache.h). Without sequence parallelism.
  std::vector<float*> TuneInputs(Workspace& ws);
  // Called by StageBackward after each of this stage's layers has added its gradients, with the
  // arena range [lo, hi) (elements) of that layer's parameters; null = no calls. A pipeline
  // executor sets it for the last backward pass of a step, when those gradients are final, so
  // that the data-parallel reduction of their buckets can start while lower layers still run.
  void set_layer_grads_done(std::function<void(size_t lo, size_t hi)> fn) {
    layer_grads_done_ = std::move(fn);
  }
  // Gradient w.r.t. the stage's input, to send to the previous stage (after StageBackward). (On
  // the first stage, with hidden dropout, the gradient at the embedding lookup instead.)
  const float* StageInputGrad(const Workspace& ws) const { return ws.dx; }
  bool is_first_stage() const { return first_layer_ == 0; }
  // This stage's layers: [first_layer(), end_layer()) (0-based).
  int first_layer() const { return first_layer_; }
  int end_layer() const { return end_layer_; }
  bool is_last_stage() const { return end_layer_ == depth_; }
  // The layers the stages split (num_layers unless StageSpec::depth cut the model short).
  int depth() const { return depth_; }
  // Whether this stage holds the final norm and head (the last stage of an uncut model).
  bool has_final_head() const { return end_layer_ == config_.num_layers; }
  bool ExitIsLocal(int i) const;
  // Whether pipeline stage `stage` holds a copy of the word embedding.
  // Whether a tensor name is one of an exit head's own tensors ("exits.<i>.*"; a head tied to
  // the word embedding has none): what EE-Tuning trains.
  static bool IsExitTensor(const std::string& name);
  static bool StageHasWordEmbedding(const ModelConfig& c, StageSpec stage);
  // Index of the word embedding in params(), or -1 when this stage holds none.
  int word_embedding() const { return word_emb_; }

  // ---- pieces shared with inference --------------------------------------------------------
  const BlockParams& layer(int l) const { return layers_[l - first_layer_]; }
  const ExitHeadParams& exit_head(int i) const { return exits_[i]; }
  // out[n, c] = word embedding (+ learned positions: `pos` in [0, max_seq_len), the caller's
  // guarantee, unchecked on the device).
  // With `dropout_row0` >= 0 (training), hidden dropout of the output (set_hidden_dropout).
  void Embed(float* out, const int32_t* ids, const int32_t* pos, int n, int64_t dropout_row0 = -1);
  // Final hidden of an exit head over n rows (training: cache null; inference: the block exit's
  // own KV segments, see BlockForward).
  ConstOperand ExitHidden(int i, ExitActs& a, const float* in, const int32_t* pos, int b, int t,
                          const std::vector<KvSegment>* cache, int64_t dropout_row0 = -1);
  // Final hidden after the final norm.
  ConstOperand FinalHidden(NormActs& a, const float* x, int n);
  // logits[n, vocab] = hidden @ W^T with W the output weight of exit i (or final when i < 0).
  void Project(Operand logits, ConstOperand hidden, int exit_index, int n);
  // Rows whose logits the heads compute at a time (the head scratch holds that many rows):
  // `rows` > 0 sets it (tests), 0 = automatic (at most 2^24 logits, 64 MiB in fp32, on the CPU;
  // 2^28 on a GPU). Set it before making workspaces.
  void set_logits_chunk_rows(int rows) { logits_chunk_rows_ = rows; }
  // Deferred losses (the pipeline executor's passes): while `log` is set, the heads queue their
  // per-row losses in it (models/loss_log.h) instead of reading them back, and the reports of
  // the passes hold 0 for their mean losses and objective terms until the log adds them.
  void set_loss_log(LossLog* log) { loss_log_ = log; }
  int LogitsChunkRows(int n) const;
  int OutputWeight(int exit_index) const;
  ExitActs MakeExitActs(Arena& a, int exit_index, int n, bool training);

 private:
  Model(const ModelConfig& c, Backend* be) : config_(c), local_(c), be_(be) {}
  int first_layer_ = 0, end_layer_ = 0, depth_ = 0;
  StageSpec stage_;
  void DeclareParams();
  // Loss over `hidden` with output weight of exit i (-1 final); when backward, writes
  // ws.dhidden and accumulates dW. Returns {mean loss, weighted objective term}.
  std::pair<double, double> HeadLoss(Workspace& ws, ConstOperand hidden, int exit_index,
                                     float weight, bool confidence_weighted, bool backward);
  // The workspace rows of the hidden state at `depth` (the stage's input at its first layer).
  float* HiddenAt(const Workspace& ws, int depth) const;
  // The rows exit i reads: the hidden state at its depth, or for a post MLP exit its layer's
  // attention residual.
  float* ExitInput(const Workspace& ws, size_t i) const;
  void ExitBackward(int i, ExitActs& a, float* din, const float* dhidden, const float* in,
                    const int32_t* pos, int b, int t, const GradScratch& s, int64_t dropout_row0);
  // ctx() with the hidden dropout of `site` (DropoutSite) for a pass from row `dropout_row0`
  // (none when negative or without dropout).
  LayerContext DropCtx(int64_t dropout_row0, uint64_t site);
  static uint64_t LayerSite(int layer) { return static_cast<uint64_t>(layer); }
  static uint64_t ExitSite(int exit) { return (uint64_t{1} << 32) + static_cast<uint64_t>(exit); }
  static constexpr uint64_t kEmbeddingSite = uint64_t{1} << 33;
  // Runs the local exits reading `depth`; their input gradients go into ws.dx / d_h_extra, or
  // into ws.exit_grad when `store` is set.
  void ExitsAtDepth(Workspace& ws, int depth, absl::Span<const float> w, bool backward,
                    float loss_scale, LossReport& r, bool store = false);
  // Adds the stored exit gradients of `depth` (after StageExitHeads); returns the d(h_attn)
  // extra gradient for an MLP-branch post exit, or null.
  const float* AddStoredExitGrads(Workspace& ws, int depth, absl::Span<const float> w);
  void SetTargets(Workspace& ws, const int32_t* targets, const float* mask, LossReport& r);

  ModelConfig config_;  // the whole model
  ModelConfig local_;   // this tensor-parallel rank's share (== config_ without tp)
  TpSpec tp_;
  Backend* be_;
  ParamStore params_;
  int word_emb_ = -1, pos_emb_ = -1, output_ = -1;
  NormParams final_norm_;
  std::vector<BlockParams> layers_;
  std::vector<std::pair<size_t, size_t>> layer_ranges_;  // arena [lo, hi) of each local layer
  std::function<void(size_t, size_t)> layer_grads_done_;
  int logits_chunk_rows_ = 0;
  LossLog* loss_log_ = nullptr;
  float hidden_dropout_ = 0;
  uint64_t dropout_seed_ = 0;
  int forward_end_ = -1;
  // The heads' scratch, one chunk of rows: logits [rows, vocab] in the backend's operand dtype,
  // overwritten by their gradients, which the heads' backward GEMMs read. Shared by all
  // workspaces (HeadLoss runs one at a time), sized at MakeWorkspace, and only on stages that
  // hold a head.
  Buffer head_logits_;
  // Sequence parallelism's whole-row scratch (models/sequence_parallel.h), sized at
  // MakeWorkspace, shared like the heads' scratch (and with other chunks: ShareSpScratch).
  struct SpBuffers {
    Buffer gathered, gathered_f32, full, local;
    SpScratch scratch;  // their pointers
  };
  std::shared_ptr<SpBuffers> sp_ = std::make_shared<SpBuffers>();
  std::vector<ExitHeadParams> exits_;
};

}  // namespace eellm
