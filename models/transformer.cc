#include "models/transformer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/core/dropout.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"

namespace eellm {

namespace {
constexpr char kExitPrefix[] = "exits.";  // exit heads' tensors: exits.<i>.*
}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config, Backend* be,
                                                     StageSpec stage, TpSpec tp,
                                                     ModelGradients grads) {
  const int depth = stage.depth == 0 ? config.num_layers : stage.depth;
  if (depth < 1 || depth > config.num_layers || depth < DeepestExitDepth(config)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot cut the model after layer ", depth, ": it has ", config.num_layers,
                     " layers and its deepest exit reads layer ", DeepestExitDepth(config)));
  }
  if (stage.stages < 1 || stage.stage < 0 || stage.stage >= stage.stages ||
      depth % stage.stages != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot split ", depth, " layers into pipeline stage ", stage.stage, " of ", stage.stages));
  }
  if (tp.size > 1 && !SplitsOverTp(config, tp.size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "heads ", config.num_heads, ", ffn_hidden_size ", config.ffn_hidden_size,
        " and vocab_size ", config.vocab_size, " must all be divisible by tp ", tp.size,
        ", and KV heads ", config.num_kv_heads, " must divide or be divisible by it"));
  }
  if (tp.sequence_parallel && tp.size > 1 && grads == ModelGradients::kNone) {
    return absl::InvalidArgumentError(
        "sequence parallelism is for training: inference runs plain tensor parallelism");
  }
  std::unique_ptr<Model> m(new Model(config, be));
  m->tp_ = tp;
  if (tp.size > 1) m->local_ = LocalConfig(config, tp.size);
  const int per_stage = depth / stage.stages;
  m->depth_ = depth;
  m->stage_ = stage;
  m->first_layer_ = stage.stage * per_stage;
  m->end_layer_ = m->first_layer_ + per_stage;
  m->DeclareParams();
  if (grads == ModelGradients::kExits) {
    for (ParamInfo& p : m->params_.mutable_params()) p.trainable = IsExitTensor(p.name);
  }
  m->params_.Allocate(be, /*gradients=*/grads == ModelGradients::kAll);
  if (grads == ModelGradients::kExits) m->params_.KeepGradientsFrom(m->params_.TrainableFrom());
  return m;
}

bool Model::ExitIsLocal(int i) const {
  return ExitStage(config_, i, stage_.stages, depth_) == stage_.stage;
}

int Model::ExitStage(const ModelConfig& c, int i, int stages, int depth) {
  const int per_stage = (depth == 0 ? c.num_layers : depth) / stages;
  // A "pre" exit of the layer after a cut reads the cut's depth: the last stage's.
  return std::min((c.exits[i].layer - 1) / per_stage, stages - 1);
}

bool Model::StageHasWordEmbedding(const ModelConfig& c, StageSpec stage) {
  const bool final_head = stage.depth == 0 || stage.depth == c.num_layers;
  bool needs =
      stage.stage == 0 || (stage.stage == stage.stages - 1 && final_head && c.tie_embeddings);
  for (size_t i = 0; i < c.exits.size(); ++i) {
    needs |= c.exits[i].tied &&
             ExitStage(c, static_cast<int>(i), stage.stages, stage.depth) == stage.stage;
  }
  return needs;
}

void Model::DeclareParams() {
  const ModelConfig& c = config_;
  const ModelConfig& l = local_;  // shapes: this tensor-parallel rank's share
  const bool split = tp_.size > 1;
  auto vocab_rows = [&](const std::string& name) {  // [vocab / tp, hidden], split along rows
    const int i = params_.Add(name, {l.vocab_size, l.hidden_size}, true);
    if (split) params_.mutable_params()[i].split_dim = 0;
    return i;
  };
  if (StageHasWordEmbedding(c, stage_)) {
    word_emb_ = vocab_rows("embedding.word.weight");
  }
  if (is_first_stage() && c.learned_positions()) {
    pos_emb_ = params_.Add("embedding.position.weight", {c.max_seq_len, c.hidden_size}, true);
  }
  for (int layer = first_layer_; layer < end_layer_; ++layer) {
    const size_t first = params_.params().size();
    layers_.push_back(AddBlockParams(params_, l, absl::StrCat("layers.", layer, ".")));
    const ParamInfo& a = params_.params()[first];
    const ParamInfo& b = params_.params().back();
    layer_ranges_.emplace_back(a.offset, b.offset + b.numel);
  }
  if (has_final_head()) {
    final_norm_ = AddNormParams(params_, l, "final_norm");
    if (!c.tie_embeddings) {
      output_ = vocab_rows("output.weight");
    }
  }
  exits_.resize(c.exits.size());
  for (size_t i = 0; i < c.exits.size(); ++i) {
    if (!ExitIsLocal(i)) continue;
    const ExitConfig& x = c.exits[i];
    const std::string prefix = absl::StrCat(kExitPrefix, i, ".");
    ExitHeadParams& p = exits_[i];
    if (x.kind == ExitKind::kMlp) p.mlp = AddMlpParams(params_, l, prefix);
    if (x.kind == ExitKind::kBlock) p.block = AddBlockParams(params_, l, prefix + "block.");
    if (x.kind != ExitKind::kLinear) p.norm = AddNormParams(params_, l, prefix + "norm");
    if (!x.tied) p.head = vocab_rows(prefix + "head.weight");
  }
  if (ctx().seq_parallel()) {
    // Norms see this rank's rows only: their gains' and biases' gradients are partial sums.
    for (ParamInfo& p : params_.mutable_params()) {
      const auto ends = [&](const std::string& s) {
        return p.name.size() >= s.size() &&
               p.name.compare(p.name.size() - s.size(), s.size(), s) == 0;
      };
      if (p.split_dim < 0 && (ends("norm.weight") || ends("norm.bias"))) p.sum_grad_over_tp = true;
    }
  }
}

namespace {
// FNV-1a: a stable hash of a tensor name (seeds its initialisation).
uint64_t NameHash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t k = std::char_traits<char>::length(suffix);
  return s.size() >= k && s.compare(s.size() - k, k, suffix) == 0;
}

// The initial values of the whole tensor (every tensor-parallel rank's slice of it): norms 1,
// biases 0, other weights normal with std 0.02 (residual-branch outputs resid_std), from one
// sequential stream seeded by the tensor's name and the seed, so that every layout and thread
// count starts from the same weights.
std::vector<float> WholeInitialValues(const ParamInfo& p, int64_t n, uint64_t seed, float std0,
                                      float resid_std) {
  if (EndsWith(p.name, "norm.weight")) return std::vector<float>(n, 1.0f);
  std::vector<float> whole(n, 0.0f);
  if (EndsWith(p.name, ".bias")) return whole;
  const float std =
      (EndsWith(p.name, "attn.wo.weight") || EndsWith(p.name, "mlp.fc2.weight")) ? resid_std : std0;
  Rng rng(seed ^ NameHash(p.name));
  for (auto& v : whole) v = static_cast<float>(rng.Normal()) * std;
  return whole;
}
}  // namespace

void Model::InitRandom(uint64_t seed, float std) {
  const float resid_std = std / std::sqrt(2.0f * config_.num_layers);
  const std::vector<ParamInfo>& params = params_.params();
  const int count = static_cast<int>(params.size());
  auto whole_numel = [&](const ParamInfo& p) {
    Shape global = p.shape;
    if (p.split_dim >= 0) global[p.split_dim] *= tp_.size / p.tp_replicas;
    return NumElements(global);
  };
  // Whole tensors are generated on host threads (one per tensor: ~20 ns per value, so a 1.3B
  // model took ~25 s on one core), in batches of about kBatch values to bound host memory; then
  // each rank's slice goes to the backend in order.
  constexpr int64_t kBatch = int64_t{1} << 28;
  std::vector<std::vector<float>> wholes;
  std::vector<float> local;
  for (int first = 0, last = 0; first < count; first = last) {
    int64_t total = 0;
    for (last = first;
         last < count && (last == first || total + whole_numel(params[last]) <= kBatch); ++last) {
      total += whole_numel(params[last]);
    }
    wholes.assign(last - first, {});
#pragma omp parallel for schedule(dynamic, 1) if (total >= (int64_t{1} << 22))
    for (int i = first; i < last; ++i) {
      wholes[i - first] =
          WholeInitialValues(params[i], whole_numel(params[i]), seed, std, resid_std);
    }
    for (int i = first; i < last; ++i) {
      const ParamInfo& p = params[i];
      const std::vector<float>& whole = wholes[i - first];
      local.resize(p.numel);
      if (p.split_dim < 0) {
        local = whole;
      } else if (p.split_dim == 0) {  // rows [block * r, (block + 1) * r)
        std::copy_n(whole.begin() + (tp_.rank / p.tp_replicas) * p.numel, p.numel, local.begin());
      } else {  // columns of each row
        const int64_t rows = p.shape[0], cols = p.shape[1];
        for (int64_t r = 0; r < rows; ++r) {
          std::copy_n(whole.begin() + r * cols * tp_.size + tp_.rank * cols, cols,
                      local.begin() + r * cols);
        }
      }
      be_->CopyFromHost(params_.param(i), local.data(), p.numel * sizeof(float));
    }
  }
}

int Model::OutputWeight(int exit_index) const {
  if (exit_index >= 0 && !config_.exits[exit_index].tied) return exits_[exit_index].head;
  if (exit_index < 0 && !config_.tie_embeddings) return output_;
  return word_emb_;
}

ExitActs Model::MakeExitActs(Arena& a, int i, int n, bool training) {
  ExitActs r;
  const ExitConfig& x = config_.exits[i];
  const int rows = ResidualRows(n);
  if (x.kind == ExitKind::kMlp) {
    r.mlp = MakeMlpActs(a, local_, n, rows);
    r.mlp_out = a.Floats(static_cast<size_t>(rows) * config_.hidden_size);
  }
  if (x.kind == ExitKind::kBlock) r.block = MakeBlockActs(a, local_, n, training, rows);
  if (x.kind != ExitKind::kLinear) r.norm = MakeNormActs(a, rows, config_.hidden_size);
  return r;
}

std::unique_ptr<Workspace> Model::MakeWorkspace(int b, int t) {
  EE_CHECK(t <= config_.max_seq_len, "sequence length ", t, " exceeds max_seq_len ",
           config_.max_seq_len);
  auto ws = std::make_unique<Workspace>(be_);
  const int n = b * t, c = config_.hidden_size, rows = ResidualRows(n);
  EE_CHECK(rows * tp_.size == n || rows == n, "sequence parallelism splits ", n,
           " rows (micro_batch_size x seq_len) unevenly over tp ", tp_.size);
  const size_t nc = static_cast<size_t>(rows) * c;  // the residual stream's elements here
  Arena& a = ws->arena;
  ws->b = b;
  ws->t = t;
  ws->ids = a.Ints(n);
  ws->targets = a.Ints(n);
  ws->pos = a.Ints(n);
  std::vector<int32_t> pos(n);
  for (int r = 0; r < n; ++r) pos[r] = r % t;
  be_->CopyFromHost(ws->pos, pos.data(), n * sizeof(int32_t));
  ws->weights = a.Floats(n);
  ws->x0 = a.Floats(nc);
  for (int l = first_layer_; l < end_layer_; ++l) {
    ws->layers.push_back(MakeBlockActs(a, local_, n, /*training=*/true, rows));
  }
  if (has_final_head()) ws->final_norm = MakeNormActs(a, rows, c);
  if (ctx().seq_parallel()) {
    const size_t whole = static_cast<size_t>(n) * c;
    const DType op = be_->operand_dtype();
    SpBuffers& s = *sp_;
    if (s.gathered.bytes() < whole * DTypeSize(op)) {
      s.gathered = Buffer(be_, whole * DTypeSize(op));
      s.full = Buffer(be_, whole * sizeof(float));
      s.local = Buffer(be_, nc * sizeof(float));
      if (op != DType::kF32) s.gathered_f32 = Buffer(be_, whole * sizeof(float));
    }
    s.scratch = SpScratch{Operand(s.gathered.data(), op), s.gathered_f32.f32(), s.full.f32(),
                          s.local.f32()};
  }
  for (size_t i = 0; i < config_.exits.size(); ++i) {
    ws->exits.push_back(ExitIsLocal(i) ? MakeExitActs(a, i, n, /*training=*/true) : ExitActs{});
    ws->exit_grad.push_back(ExitIsLocal(i) ? a.Floats(nc) : nullptr);
  }
  bool has_head = has_final_head();
  for (size_t i = 0; i < config_.exits.size(); ++i) has_head = has_head || ExitIsLocal(i);
  const size_t logits = static_cast<size_t>(LogitsChunkRows(n)) * local_.vocab_size;
  if (has_head && head_logits_.bytes() < logits * DTypeSize(be_->operand_dtype())) {
    head_logits_ = Buffer(be_, logits * DTypeSize(be_->operand_dtype()));
  }
  ws->losses = a.Floats(n);
  ws->max_prob = a.Floats(n);
  ws->gs = MakeGradScratch(a, local_, n, hidden_dropout_ > 0);
  if (tp_.size > 1) ws->vocab_ce = std::make_unique<VocabParallelCrossEntropy>(be_, tp_.comm, n);
  ws->dx = a.Floats(nc);
  ws->dx_prev = a.Floats(nc);
  ws->d_h_extra = a.Floats(nc);
  ws->dhidden = a.Floats(nc);
  ws->dexit = a.Floats(nc);
  ws->host_mask.resize(n);
  ws->host_losses.resize(n);
  ws->host_max_prob.resize(n);
  ws->host_weights.resize(n);
  ws->host_scaled_weights.resize(n);
  return ws;
}

LayerContext Model::DropCtx(int64_t dropout_row0, uint64_t site) {
  LayerContext cx = ctx();
  if (hidden_dropout_ > 0 && dropout_row0 >= 0) {
    cx.drop = {hidden_dropout_, DropoutMix(dropout_seed_ ^ DropoutMix(site)), dropout_row0};
  }
  return cx;
}

void Model::Embed(float* out, const int32_t* ids, const int32_t* pos, int n, int64_t dropout_row0) {
  const int c = config_.hidden_size;
  // Sequence parallelism: each rank's vocabulary rows into the whole-row scratch (positions on
  // rank 0's), reduce-scattered to this rank's rows.
  const bool sp = ctx().seq_parallel();
  float* whole = sp ? sp_->scratch.full : out;
  if (sp) {
    const VocabShard shard = vocab_shard();
    be_->EmbeddingForwardRange(whole, ids, params_.param(word_emb_), n, c, shard.start, shard.rows);
  } else if (tp_.size > 1) {
    VocabParallelEmbedding(be_, tp_.comm, out, ids, params_.param(word_emb_), n, c, vocab_shard());
  } else {
    be_->EmbeddingForward(out, ids, params_.param(word_emb_), n, c);
  }
  if (pos_emb_ >= 0 && (!sp || tp_.rank == 0)) {
    // Rows of the position table added in one op (one per token cost 82 ms of a 125 ms GPT-2
    // step on an H200: 8192 launches). The positions are in range by construction (the callers
    // check their lengths against max_seq_len), so nothing is read back here: that read-back
    // stalled the host once per micro-batch.
    be_->EmbeddingAdd(whole, pos, params_.param(pos_emb_), n, c);
  }
  if (sp) ReduceScatterRows(tp_.comm, whole, out, ResidualRows(n), c);
  const LayerContext cx = DropCtx(dropout_row0, kEmbeddingSite);
  if (cx.dropout()) {
    const int rows = ResidualRows(n);
    be_->DropoutAdd(out, nullptr, out, rows, c, cx.drop.p, cx.drop.key,
                    cx.drop.row0 + (sp ? int64_t{tp_.rank} * rows : 0));
  }
}

ConstOperand Model::ExitHidden(int i, ExitActs& a, const float* in, const int32_t* pos, int b,
                               int t, const std::vector<KvSegment>* cache, int64_t dropout_row0) {
  const ExitConfig& x = config_.exits[i];
  const ExitHeadParams& p = exits_[i];
  const int n = b * t, rows = ResidualRows(n);
  LayerContext cx = DropCtx(dropout_row0, ExitSite(i));
  // Under sequence parallelism the head reads every row: this rank's are gathered with the
  // others'.
  auto whole = [&](ConstOperand local) {
    return cx.seq_parallel()
               ? GatherRows(be_, tp_.comm, sp_->scratch, local, rows, config_.hidden_size)
               : local;
  };
  switch (x.kind) {
    case ExitKind::kLinear:
      return whole(in);
    case ExitKind::kNorm:
      NormForward(cx, p.norm, a.norm, in, rows);
      return whole(a.norm.out);
    case ExitKind::kMlp:
      MlpForward(cx, p.mlp, a.mlp, a.mlp_out, in, n);
      NormForward(cx, p.norm, a.norm, a.mlp_out, rows);
      return whole(a.norm.out);
    case ExitKind::kBlock:
      BlockForward(cx, p.block, a.block, in, pos, b, t, cache);
      NormForward(cx, p.norm, a.norm, a.block.out, rows);
      return whole(a.norm.out);
  }
  return nullptr;
}

ConstOperand Model::FinalHidden(NormActs& a, const float* x, int n) {
  const int rows = ResidualRows(n);
  NormForward(ctx(), final_norm_, a, x, rows);
  if (!ctx().seq_parallel()) return a.out;
  return GatherRows(be_, tp_.comm, sp_->scratch, a.out, rows, config_.hidden_size);
}

void Model::Project(Operand logits, ConstOperand hidden, int exit_index, int n) {
  be_->Linear(logits, hidden, params_.param(OutputWeight(exit_index)), nullptr, n,
              config_.hidden_size, local_.vocab_size, false);
}

int Model::LogitsChunkRows(int n) const {
  // Unless set otherwise: at most 2^24 fp32 logits (64 MiB) at a time on the CPU, 2^28 (1 GiB in
  // fp32, 512 MiB in bf16) on a GPU. Each chunk's backward adds to the head's weight gradient
  // [vocab, c] through a GEMM of depth `rows` that reads and writes all of it (8 bytes per
  // element), beside the head's 6 rows vocab c FLOPs per chunk: that traffic costs (4/3) (FLOP/s /
  // bytes/s) / rows of the head's GEMM time. On an H100 (~700 TFLOP/s achieved, 3.35 TB/s) that is
  // 53% at 524 rows (2^24 logits of a 32k vocabulary) and 3% at 8,192 (2^28); on a CPU (~10 FLOP
  // per byte) it is negligible either way.
  const int64_t budget = int64_t{1} << (be_->device() == Device::kCuda ? 28 : 24);
  const int rows =
      logits_chunk_rows_ > 0
          ? logits_chunk_rows_
          : static_cast<int>(std::min<int64_t>(std::numeric_limits<int>::max(),
                                               std::max<int64_t>(1, budget / local_.vocab_size)));
  return std::max(1, std::min(n, rows));
}

std::pair<double, double> Model::HeadLoss(Workspace& ws, ConstOperand hidden, int exit_index,
                                          float weight, bool confidence_weighted, bool backward) {
  const int n = ws.b * ws.t, v = local_.vocab_size;
  const size_t h = config_.hidden_size;
  // The logits of `chunk` rows at a time (head_logits_ holds one chunk), so the whole
  // [n, vocab] matrix never exists: project, cross-entropy (its gradient in place), then the
  // projection's backward for those rows. The logits are an operand: bf16 with bf16 operands,
  // as the GEMM rounds them (half the bytes written, read by the cross-entropy and, as their
  // gradients, by the backward's GEMMs), as PyTorch's autocast and Megatron-LM keep them.
  const int chunk = LogitsChunkRows(n);
  const Operand logits(head_logits_.data(), be_->operand_dtype());
  EE_CHECK(head_logits_.bytes() >= static_cast<size_t>(chunk) * v * DTypeSize(logits.dtype),
           "the head scratch holds fewer than ", chunk, " rows of logits");
  // Cross-entropy of rows [r0, r0 + rows) over this rank's vocabulary columns (combined over tp
  // without gathering).
  // Confidence weighting (an exit's loss per row times its detached max probability) is applied
  // inside the cross-entropy: one pass, the confidences stay on the device.
  float* max_prob = confidence_weighted ? ws.max_prob : nullptr;
  auto cross_entropy = [&](int r0, int rows, Operand dlogits) {
    float* mp = max_prob != nullptr ? max_prob + r0 : nullptr;
    if (ws.vocab_ce) {
      ws.vocab_ce->Run(ws.losses + r0, mp, dlogits, logits, ws.targets + r0, ws.weights + r0,
                       confidence_weighted, rows, vocab_shard());
    } else {
      be_->CrossEntropy(ws.losses + r0, mp, dlogits, logits, ws.targets + r0, ws.weights + r0,
                        confidence_weighted, rows, v);
    }
  };
  // An exit's loss is that of its logits divided by its temperature (as EE-LLM trains them):
  // the logits are scaled after the projection, and the gradient w.r.t. the unscaled logits is
  // the scaled logits' gradient over the temperature, which the per-row weights carry.
  const float inv_temperature =
      exit_index >= 0 ? 1.0f / config_.exits[exit_index].temperature : 1.0f;
  auto project = [&](int r0, int rows) {
    Project(logits, hidden.At(r0 * h), exit_index, rows);
    if (inv_temperature != 1.0f) be_->Scale(logits, inv_temperature, static_cast<size_t>(rows) * v);
  };
  // The hidden state's gradient over every row (vocabulary-partial under tp): ws.dhidden, or
  // under sequence parallelism the whole-row scratch, reduce-scattered into ws.dhidden.
  const bool sp = ctx().seq_parallel();
  float* dhidden = sp ? sp_->scratch.full : ws.dhidden;
  double count = 0;
  for (float m : ws.host_mask) count += m;
  if (count == 0) {
    // Every position masked: no loss, and no gradient from this head.
    if (backward) be_->Fill(ws.dhidden, static_cast<size_t>(ResidualRows(n)) * h, 0.0f);
    return {0.0, 0.0};
  }
  for (int r = 0; r < n; ++r) {
    ws.host_weights[r] = static_cast<float>(ws.host_mask[r] / count * weight);
  }
  const float* gradient_weights = ws.host_weights.data();
  if (inv_temperature != 1.0f) {
    for (int r = 0; r < n; ++r) ws.host_scaled_weights[r] = ws.host_weights[r] * inv_temperature;
    gradient_weights = ws.host_scaled_weights.data();
  }
  be_->CopyFromHost(ws.weights, gradient_weights, n * sizeof(float));
  const int w = OutputWeight(exit_index);
  for (int r0 = 0; r0 < n; r0 += chunk) {
    const int rows = std::min(chunk, n - r0);
    project(r0, rows);
    cross_entropy(r0, rows, backward ? logits : Operand());  // gradient in place
    if (backward) {
      // A frozen head (EE-Tuning: tied to the word embedding) needs no weight gradient.
      float* dw = params_.params()[w].trainable ? params_.grad(w) : nullptr;
      be_->LinearBackward(dhidden + r0 * h, dw, nullptr, logits, hidden.At(r0 * h),
                          params_.param(w), rows, config_.hidden_size, v, false);
    }
  }
  HeadLossSums sums;  // zero when deferred: the step's LossLog adds them at its end
  // A head of weight 0 (reported, not trained) adds no term, not even 0 * an infinite loss.
  const float* term_weights = weight != 0.0f ? ws.host_weights.data() : nullptr;
  if (loss_log_ != nullptr) {
    loss_log_->Add(exit_index, ws.losses, n, ws.host_mask.data(), count, term_weights,
                   term_weights != nullptr ? max_prob : nullptr);
  } else {
    be_->CopyToHost(ws.host_losses.data(), ws.losses, n * sizeof(float));
    const bool confidences = term_weights != nullptr && max_prob != nullptr;
    if (confidences) be_->CopyToHost(ws.host_max_prob.data(), max_prob, n * sizeof(float));
    sums = SumHeadLoss(ws.host_losses.data(), ws.host_mask.data(), count, term_weights,
                       confidences ? ws.host_max_prob.data() : nullptr, n);
  }
  if (backward) {
    // The hidden state feeds every rank's vocabulary columns: sum their gradients.
    if (sp) {
      ReduceScatterRows(tp_.comm, dhidden, ws.dhidden, ResidualRows(n), config_.hidden_size);
    } else {
      TpAllReduce(tp_.comm, ws.dhidden, static_cast<size_t>(n) * config_.hidden_size);
    }
  }
  return {sums.mean, sums.term};
}

// din += d/d(in) of exit i's hidden given dhidden (= ws.dhidden).
void Model::ExitBackward(int i, ExitActs& a, float* din, const float* dhidden, const float* in,
                         const int32_t* pos, int b, int t, const GradScratch& s,
                         int64_t dropout_row0) {
  const ExitConfig& x = config_.exits[i];
  const ExitHeadParams& p = exits_[i];
  const int n = b * t, rows = ResidualRows(n);
  const size_t nc = static_cast<size_t>(rows) * config_.hidden_size;
  LayerContext cx = DropCtx(dropout_row0, ExitSite(i));
  switch (x.kind) {
    case ExitKind::kLinear:
      be_->Axpy(din, 1.0f, dhidden, nc);
      return;
    case ExitKind::kNorm:
      NormBackward(cx, p.norm, a.norm, din, din, dhidden, in, rows);
      return;
    case ExitKind::kMlp: {
      float* dm = s.dh;  // free here: the MLP branch backward does not use dh
      NormBackward(cx, p.norm, a.norm, dm, nullptr, dhidden, a.mlp_out, rows);
      be_->Axpy(din, 1.0f, dm, nc);
      MlpBranchBackward(cx, p.mlp, a.mlp, din, din, dm, in, n, s);
      return;
    }
    case ExitKind::kBlock:
      return;  // handled by the caller (needs two extra buffers)
  }
}

float* Model::HiddenAt(const Workspace& ws, int depth) const {
  return depth == first_layer_ ? ws.x0 : ws.layers[depth - 1 - first_layer_].out;
}

float* Model::ExitInput(const Workspace& ws, size_t i) const {
  const ExitConfig& x = config_.exits[i];
  return x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost
             ? ws.layers[x.layer - 1 - first_layer_].h_attn
             : HiddenAt(ws, x.depth());
}

void Model::ExitsAtDepth(Workspace& ws, int depth, absl::Span<const float> w, bool backward,
                         float loss_scale, LossReport& r, bool store) {
  const int b = ws.b, t = ws.t, n = b * t, rows = ResidualRows(n);
  const size_t nc = static_cast<size_t>(rows) * config_.hidden_size;
  for (size_t i = 0; i < config_.exits.size(); ++i) {
    const ExitConfig& x = config_.exits[i];
    if (x.depth() != depth || !ExitIsLocal(i)) continue;
    const bool reads_h_attn = x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost;
    const float* in = ExitInput(ws, i);
    const ConstOperand hidden =
        ExitHidden(i, ws.exits[i], in, ws.pos, b, t, nullptr, ws.dropout_row0);
    const bool bw = backward && w[i] > 0;
    auto [mean, term] =
        HeadLoss(ws, hidden, i, w[i] * loss_scale, config_.confidence_weighted_exit_loss, bw);
    r.exit_losses[i] = mean;
    r.objective += term;
    if (!bw) continue;
    float* din = store ? ws.exit_grad[i] : (reads_h_attn ? ws.d_h_extra : ws.dx);
    if (store || reads_h_attn) be_->Fill(din, nc, 0.0f);
    if (x.kind == ExitKind::kBlock) {
      // dexit = d(block out); dhidden is free after the norm backward and takes d(in).
      const ExitHeadParams& p = exits_[i];
      NormBackward(ctx(), p.norm, ws.exits[i].norm, ws.dexit, nullptr, ws.dhidden,
                   ws.exits[i].block.out, rows);
      BlockBackward(DropCtx(ws.dropout_row0, ExitSite(i)), p.block, ws.exits[i].block, ws.dhidden,
                    ws.dexit, nullptr, in, ws.pos, b, t, ws.gs);
      be_->Axpy(din, 1.0f, ws.dhidden, nc);
    } else {
      ExitBackward(i, ws.exits[i], din, ws.dhidden, in, ws.pos, b, t, ws.gs, ws.dropout_row0);
    }
  }
}

void Model::StageForward(Workspace& ws, const int32_t* ids, const float* input) {
  const int b = ws.b, t = ws.t, n = b * t;
  if (is_first_stage()) {
    be_->CopyFromHost(ws.ids, ids, n * sizeof(int32_t));
    Embed(ws.x0, ws.ids, ws.pos, n, ws.dropout_row0);
  } else {
    be_->Copy(ws.x0, input,
              static_cast<size_t>(ResidualRows(n)) * config_.hidden_size * sizeof(float));
  }
  const float* x = ws.x0;
  for (int l = first_layer_; l < ForwardEnd(); ++l) {
    BlockActs& acts = ws.layers[l - first_layer_];
    BlockForward(DropCtx(ws.dropout_row0, LayerSite(l)), layers_[l - first_layer_], acts, x, ws.pos,
                 b, t, nullptr);
    x = acts.out;
  }
}

const float* Model::StageOutput(const Workspace& ws) const { return HiddenAt(ws, end_layer_); }

int Model::ForwardEnd() const {
  return forward_end_ < 0 ? end_layer_ : std::clamp(forward_end_, first_layer_, end_layer_);
}

int Model::LastStageWithExit(const ModelConfig& c, int stages, int depth) {
  int last = 0;
  for (size_t i = 0; i < c.exits.size(); ++i) {
    last = std::max(last, ExitStage(c, static_cast<int>(i), stages, depth));
  }
  return last;
}

int Model::DeepestExitDepth(const ModelConfig& c) {
  int depth = 0;
  for (const ExitConfig& x : c.exits) depth = std::max(depth, x.depth());
  return depth;
}

LossReport Model::StageBackward(Workspace& ws, const int32_t* targets, const float* mask,
                                absl::Span<const float> exit_weights, bool backward,
                                const float* d_output, float loss_scale) {
  const ModelConfig& c = config_;
  EE_CHECK(exit_weights.size() == c.exits.size(), "need one weight per exit");
  EE_CHECK(ForwardEnd() == end_layer_, "StageBackward after a forward that stopped at layer ",
           ForwardEnd());
  const int b = ws.b, t = ws.t, n = b * t, rows = ResidualRows(n);
  const size_t nc = static_cast<size_t>(rows) * c.hidden_size;
  LossReport r;
  SetTargets(ws, targets, mask, r);
  const bool stored = ws.exits_done && backward;
  ws.exits_done = false;

  const float* x = StageOutput(ws);
  if (has_final_head()) {
    const ConstOperand hidden = FinalHidden(ws.final_norm, x, n);
    auto [final_mean, final_term] = HeadLoss(ws, hidden, -1, loss_scale, false, backward);
    r.final_loss = final_mean;
    r.objective = final_term;
    if (backward) {
      NormBackward(ctx(), final_norm_, ws.final_norm, ws.dx, nullptr, ws.dhidden, x, rows);
    }
  } else if (backward) {
    EE_CHECK(d_output != nullptr, "a backward through a model cut after layer ", depth_,
             ": only its exits train, on a frozen backbone (StageTuneExits)");
    be_->Copy(ws.dx, d_output, nc * sizeof(float));
  }
  // Walk down the layers: exits reading depth l run in the backward slot of layer l.
  for (int l = end_layer_; l > first_layer_; --l) {
    const float* extra = nullptr;
    if (stored) {
      extra = AddStoredExitGrads(ws, l, exit_weights);
    } else {
      ExitsAtDepth(ws, l, exit_weights, backward, loss_scale, r);
    }
    if (!backward) continue;
    for (size_t i = 0; i < c.exits.size() && !stored; ++i) {
      const ExitConfig& e = c.exits[i];
      if (e.depth() == l && e.kind == ExitKind::kMlp && e.position == ExitPosition::kPost &&
          exit_weights[i] > 0 && ExitIsLocal(i)) {
        extra = ws.d_h_extra;
      }
    }
    BlockBackward(DropCtx(ws.dropout_row0, LayerSite(l - 1)), layers_[l - 1 - first_layer_],
                  ws.layers[l - 1 - first_layer_], ws.dx_prev, ws.dx, extra, HiddenAt(ws, l - 1),
                  ws.pos, b, t, ws.gs);
    std::swap(ws.dx, ws.dx_prev);
    if (layer_grads_done_) {
      const auto& [lo, hi] = layer_ranges_[l - 1 - first_layer_];
      layer_grads_done_(lo, hi);
    }
  }
  if (stored) {
    AddStoredExitGrads(ws, first_layer_, exit_weights);
  } else {
    ExitsAtDepth(ws, first_layer_, exit_weights, backward, loss_scale, r);
  }
  if (backward && is_first_stage()) {
    const VocabShard shard = vocab_shard();
    if (const LayerContext cx = DropCtx(ws.dropout_row0, kEmbeddingSite); cx.dropout()) {
      be_->DropoutBackward(ws.dx, ws.dx, rows, c.hidden_size, cx.drop.p, cx.drop.key,
                           cx.drop.row0 + (cx.seq_parallel() ? int64_t{tp_.rank} * rows : 0));
    }
    const float* dx = ctx().seq_parallel()
                          ? GatherGradRows(tp_.comm, sp_->scratch, ws.dx, rows, c.hidden_size)
                          : ws.dx;
    be_->EmbeddingBackwardRange(params_.grad(word_emb_), ws.ids, dx, n, c.hidden_size, shard.start,
                                shard.rows);
    if (pos_emb_ >= 0) {
      be_->EmbeddingBackward(params_.grad(pos_emb_), ws.pos, dx, n, c.hidden_size);
    }
  }
  return r;
}

void Model::SetTargets(Workspace& ws, const int32_t* targets, const float* mask, LossReport& r) {
  const int n = ws.b * ws.t;
  r.exit_losses.assign(config_.exits.size(), 0.0);
  for (int i = 0; i < n; ++i) ws.host_mask[i] = mask ? mask[i] : 1.0f;
  for (float m : ws.host_mask) r.tokens += m != 0;
  be_->CopyFromHost(ws.targets, targets, n * sizeof(int32_t));
}

LossReport Model::StageExitHeads(Workspace& ws, const int32_t* targets, const float* mask,
                                 absl::Span<const float> exit_weights, float loss_scale) {
  LossReport r;
  SetTargets(ws, targets, mask, r);
  for (int d = first_layer_; d <= end_layer_; ++d) {
    ExitsAtDepth(ws, d, exit_weights, true, loss_scale, r, /*store=*/true);
  }
  ws.exits_done = true;
  return r;
}

bool Model::IsExitTensor(const std::string& name) { return name.rfind(kExitPrefix, 0) == 0; }

LossReport Model::StageTuneExits(Workspace& ws, const int32_t* targets, const float* mask,
                                 absl::Span<const float> exit_weights, float loss_scale) {
  // The exits' backward as for a schedule's bubbles (their input gradients are stored in the
  // workspace and never used).
  LossReport r = StageExitHeads(ws, targets, mask, exit_weights, loss_scale);
  ws.exits_done = false;
  if (has_final_head() && ForwardEnd() == end_layer_) {
    const ConstOperand hidden = FinalHidden(ws.final_norm, StageOutput(ws), ws.b * ws.t);
    // Reported, not trained: weight 0, so no objective term (also where a LossLog adds it).
    r.final_loss = HeadLoss(ws, hidden, -1, 0.0f, false, /*backward=*/false).first;
  }
  return r;
}

std::vector<float*> Model::TuneInputs(Workspace& ws) {
  EE_CHECK(!ctx().seq_parallel(), "TuneInputs under sequence parallelism");
  std::vector<float*> in;
  auto add = [&in](float* p) {
    if (std::find(in.begin(), in.end(), p) == in.end()) in.push_back(p);
  };
  for (size_t i = 0; i < config_.exits.size(); ++i) {
    const int depth = config_.exits[i].depth();
    if (ExitIsLocal(i) && depth >= first_layer_ && depth <= end_layer_) add(ExitInput(ws, i));
  }
  if (has_final_head() && ForwardEnd() == end_layer_) add(HiddenAt(ws, end_layer_));
  return in;
}

const float* Model::AddStoredExitGrads(Workspace& ws, int depth, absl::Span<const float> w) {
  const size_t nc = static_cast<size_t>(ResidualRows(ws.b * ws.t)) * config_.hidden_size;
  const float* extra = nullptr;
  for (size_t i = 0; i < config_.exits.size(); ++i) {
    const ExitConfig& x = config_.exits[i];
    if (x.depth() != depth || !ExitIsLocal(i) || !(w[i] > 0)) continue;
    if (x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost) {
      be_->Copy(ws.d_h_extra, ws.exit_grad[i], nc * sizeof(float));
      extra = ws.d_h_extra;
    } else {
      be_->Axpy(ws.dx, 1.0f, ws.exit_grad[i], nc);
    }
  }
  return extra;
}

LossReport Model::ForwardBackward(Workspace& ws, const int32_t* ids, const int32_t* targets,
                                  const float* mask, absl::Span<const float> exit_weights,
                                  bool backward, float loss_scale) {
  EE_CHECK(is_first_stage() && is_last_stage(), "ForwardBackward needs the whole model");
  StageForward(ws, ids, nullptr);
  return StageBackward(ws, targets, mask, exit_weights, backward, nullptr, loss_scale);
}

}  // namespace eellm
