#include "models/generator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"

namespace eellm {

double GenerationResult::AverageLayers() const {
  if (depth.empty()) return 0;
  double s = 0;
  for (int d : depth) s += d;
  return s / depth.size();
}

double GenerationResult::DecodeTokensPerSecond() const {
  // The first token comes from the prefill; the rest from decode steps.
  return decode_seconds > 0 ? (tokens.size() > 1 ? tokens.size() - 1 : 0) / decode_seconds : 0;
}

Generator::Generator(Model* model, int capacity)
    : model_(model), be_(model->backend()), capacity_(capacity), arena_(model->backend()) {
  EE_CHECK(model->tp().size == 1, "generation with tensor parallelism is not supported yet");
  const ModelConfig& c = model->config();
  const size_t kv_elems = static_cast<size_t>(capacity) * c.num_kv_heads * c.head_dim();
  for (int l = 0; l < c.num_layers; ++l) {
    kv_.push_back(KvLayer{arena_.Operands(kv_elems), arena_.Operands(kv_elems), capacity});
  }
  for (size_t i = 0; i < c.exits.size(); ++i) {
    KvLayer kv;
    if (c.exits[i].kind == ExitKind::kBlock) {
      kv = KvLayer{arena_.Operands(kv_elems), arena_.Operands(kv_elems), capacity};
    }
    exit_kv_.push_back(kv);
    exit_acts_.push_back(model->MakeExitActs(arena_, i, capacity, /*training=*/false));
  }
  acts_ = MakeBlockActs(arena_, c, capacity, /*training=*/false);
  final_norm_ = MakeNormActs(arena_, 1, c.hidden_size);
  hidden_ = arena_.Floats(static_cast<size_t>(capacity) * c.hidden_size);
  frontier_ = arena_.Floats(static_cast<size_t>(capacity) * c.hidden_size);
  logits_ = arena_.Floats(c.vocab_size);
  ids_ = arena_.Ints(capacity);
  pos_ = arena_.Ints(capacity);
  std::vector<int32_t> pos(capacity);
  for (int i = 0; i < capacity; ++i) pos[i] = i;
  be_->CopyFromHost(pos_, pos.data(), capacity * sizeof(int32_t));
  depth_.assign(capacity, 0);
}

void Generator::Reset() {
  len_ = 0;
  pending_start_ = 0;
  std::fill(depth_.begin(), depth_.end(), 0);
}

bool Generator::ExitAllowed(int i, const EarlyExitParams& ee) const {
  if (ee.exit_layers.empty()) return true;
  const int layer = model_->config().exits[i].layer;
  return std::find(ee.exit_layers.begin(), ee.exit_layers.end(), layer) != ee.exit_layers.end();
}

StepResult Generator::Step(const std::vector<int32_t>& ids, const EarlyExitParams& ee) {
  EE_CHECK(!ids.empty() && len_ + static_cast<int>(ids.size()) <= capacity_, "generator capacity ",
           capacity_, " exceeded");
  be_->CopyFromHost(ids_ + len_, ids.data(), ids.size() * sizeof(int32_t));
  fill_exit_kv_ = ee.threshold < 1.0f;
  return Forward(static_cast<int>(ids.size()), &ee);
}

void Generator::FinishPending() {
  if (pending_start_ < len_) Forward(0, nullptr);
}

bool Generator::TryExit(int i, const float* in_rows, int m, int rows, const EarlyExitParams* ee,
                        StepResult* out) {
  const ModelConfig& c = model_->config();
  const ExitConfig& x = c.exits[i];
  const size_t ch = c.hidden_size;
  const bool check = ee != nullptr && ExitAllowed(i, *ee);
  ConstOperand last;
  if (x.kind == ExitKind::kBlock) {
    if (!fill_exit_kv_) return false;
    // The exit's own block needs K/V for every row that reaches its depth.
    const ConstOperand h =
        model_->ExitHidden(i, exit_acts_[i], in_rows, pos_ + m, 1, rows, &exit_kv_[i], m);
    last = h.At((rows - 1) * ch);
  } else if (check) {
    const float* in_last =
        (x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost ? acts_.h_attn : in_rows) +
        (rows - 1) * ch;
    last = model_->ExitHidden(i, exit_acts_[i], in_last, pos_ + m + rows - 1, 1, 1, nullptr, 0);
  }
  if (!check) return false;
  model_->Project(logits_, last, i, 1);
  out->logits.resize(c.vocab_size);
  be_->CopyToHost(out->logits.data(), logits_, c.vocab_size * sizeof(float));
  if (MaxProbability(out->logits.data(), c.vocab_size, x.temperature) < ee->threshold) return false;
  out->exit_index = i;
  out->temperature = x.temperature;
  return true;
}

StepResult Generator::Forward(int n_new, const EarlyExitParams* ee) {
  const ModelConfig& c = model_->config();
  const size_t ch = c.hidden_size;
  const int s = pending_start_, old_len = len_, end = len_ + n_new;
  const bool checks = ee != nullptr && ee->threshold < 1.0f && n_new > 0;
  const EarlyExitParams* check_ee = checks ? ee : nullptr;
  // Rows [s, old_len) resume from their stored hidden state; new rows start from embeddings.
  be_->Copy(hidden_, frontier_ + s * ch, (old_len - s) * ch * sizeof(float));
  if (n_new > 0) model_->Embed(hidden_ + (old_len - s) * ch, ids_ + old_len, pos_ + old_len, n_new);
  for (int q = old_len; q < end; ++q) depth_[q] = 0;
  len_ = end;

  StepResult r;
  bool fired = false;
  auto exits_at = [&](int depth, int m, int rows) {
    for (size_t i = 0; i < c.exits.size() && !fired; ++i) {
      if (c.exits[i].depth() != depth) continue;
      fired = TryExit(static_cast<int>(i), hidden_ + (m - s) * ch, m, rows, check_ee, &r);
      if (fired) r.depth = depth;
    }
  };
  if (n_new > 0) exits_at(0, old_len, n_new);
  for (int l = 1; l <= c.num_layers && !fired; ++l) {
    int m = s;
    while (m < end && depth_[m] >= l) ++m;
    if (m == end) continue;
    const int rows = end - m;
    float* h = hidden_ + (m - s) * ch;
    BlockForward(model_->ctx(), model_->layer(l - 1), acts_, h, pos_ + m, 1, rows, &kv_[l - 1], m);
    be_->Copy(h, acts_.out, rows * ch * sizeof(float));
    for (int q = m; q < end; ++q) depth_[q] = l;
    exits_at(l, m, rows);
  }
  if (!fired && n_new > 0) {
    const ConstOperand last = model_->FinalHidden(final_norm_, hidden_ + (end - 1 - s) * ch, 1);
    model_->Project(logits_, last, -1, 1);
    r.logits.resize(c.vocab_size);
    be_->CopyToHost(r.logits.data(), logits_, c.vocab_size * sizeof(float));
    r.depth = c.num_layers;
  }
  if (depth_[end - 1] == c.num_layers) {
    pending_start_ = end;
  } else {
    be_->Copy(frontier_ + s * ch, hidden_, (end - s) * ch * sizeof(float));
  }
  return r;
}

absl::StatusOr<GenerationResult> Generator::Generate(const std::vector<int32_t>& prompt,
                                                     int max_new_tokens, int eos_id,
                                                     const SamplingParams& sampling,
                                                     const EarlyExitParams& ee,
                                                     const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", max_new_tokens));
  }
  const int need = static_cast<int>(prompt.size()) + max_new_tokens;
  if (need > capacity_) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt.size(), " tokens) + max_new_tokens (", max_new_tokens,
                     ") = ", need, " exceeds the context length ", capacity_));
  }
  const int vocab = model_->config().vocab_size;
  for (int32_t t : prompt) {
    if (t < 0 || t >= vocab)
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", t, " is outside the vocabulary [0, ", vocab, ")"));
  }
  Reset();
  Rng rng(sampling.seed);
  GenerationResult g;
  Timer timer;
  StepResult r = Step(prompt, ee);
  g.prefill_seconds = timer.Seconds();
  timer.Reset();
  for (int i = 0; i < max_new_tokens; ++i) {
    int32_t tok = SampleToken(r.logits, sampling, rng);
    g.tokens.push_back(tok);
    g.exit_index.push_back(r.exit_index);
    g.depth.push_back(r.depth);
    if (on_token) on_token(tok);
    if (tok == eos_id) {
      g.stopped_at_eos = true;
      break;
    }
    if (i + 1 < max_new_tokens) r = Step({tok}, ee);
  }
  g.decode_seconds = timer.Seconds();
  return g;
}

}  // namespace eellm
