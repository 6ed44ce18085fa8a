#include "models/generator.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"
#include "parallel/tensor_parallel.h"

namespace eellm {

int64_t Generator::KvBytesPerToken(const Model& model) {
  const ModelConfig& c = model.config();
  const ModelConfig& local = model.local_config();
  int64_t pools = model.end_layer() - model.first_layer();
  for (size_t i = 0; i < c.exits.size(); ++i) {
    pools += c.exits[i].kind == ExitKind::kBlock && model.ExitIsLocal(static_cast<int>(i));
  }
  return pools * 2 * local.num_kv_heads * local.head_dim() *
             static_cast<int64_t>(DTypeSize(model.backend()->operand_dtype())) +
         int64_t{c.hidden_size} * static_cast<int64_t>(sizeof(float));
}

int64_t Generator::PlannedBytes(Model& model, int capacity, int max_sequences, int kv_tokens) {
  const ModelConfig& c = model.config();
  // The activations of n rows, measured on the functions the constructor calls: their growth
  // from 1 to 2 rows is the cost of a row.
  auto activations = [&](int n) {
    Arena a(model.backend());
    for (size_t i = 0; i < c.exits.size(); ++i) {
      if (model.ExitIsLocal(static_cast<int>(i))) model.MakeExitActs(a, i, n, false);
    }
    MakeBlockActs(a, model.local_config(), n, false);
    return static_cast<int64_t>(a.bytes());
  };
  const int64_t per_row = activations(2) - activations(1) +
                          2 * int64_t{c.hidden_size} * sizeof(float) +  // work_, packed_
                          2 * int64_t{sizeof(int32_t)};                 // their positions
  const int64_t seq_pages = PagesFor(capacity);
  const int64_t pages = kv_tokens > 0 ? PagesFor(kv_tokens) : seq_pages * max_sequences;
  const int64_t operand = DTypeSize(model.backend()->operand_dtype());
  // The head's rows: the final norm's output, mean and rstd, the newest hidden states, this
  // rank's logits and (under tensor parallelism) every rank's gathered.
  const int64_t gathered = model.tp().size > 1 ? c.vocab_size : 0;
  const int64_t head_row = int64_t{c.hidden_size} * (operand + sizeof(float)) + 2 * sizeof(float) +
                           (model.local_config().vocab_size + gathered) * sizeof(float);
  return pages * kKvPageTokens * KvBytesPerToken(model) +
         RowBudget(capacity, max_sequences) * per_row + HeadRows(max_sequences) * head_row +
         int64_t{max_sequences} * c.hidden_size * operand +           // newest_ops_
         int64_t{capacity} * (1 + max_sequences) * sizeof(int32_t) +  // pos_, staged_ids_
         seq_pages * max_sequences * sizeof(int32_t);                 // device_pages_
}

Generator::Generator(Model* model, int capacity, int max_sequences, int kv_tokens)
    : model_(model),
      be_(model->backend()),
      capacity_(capacity),
      row_budget_(RowBudget(capacity, max_sequences)),
      token_limit_(model->config().vocab_size),
      head_rows_(HeadRows(max_sequences)),
      first_(model->first_layer()),
      end_(model->end_layer()),
      arena_(model->backend()) {
  EE_CHECK(capacity > 0 && max_sequences > 0 && kv_tokens >= 0, "bad generator size: capacity ",
           capacity, ", max_sequences ", max_sequences, ", kv_tokens ", kv_tokens);
  const ModelConfig& c = model->config();
  const ModelConfig& local = *model->ctx().cfg;  // this tensor-parallel rank's heads
  const size_t ch = c.hidden_size;
  kv_by_request_ = kv_tokens > 0;
  // Whether a page's block-exit K/V matter is the leader's decision for every stage of a
  // pipeline, so it looks at every exit, not only this stage's.
  for (const ExitConfig& x : c.exits) block_exits_ |= x.kind == ExitKind::kBlock;
  const int seq_pages = PagesFor(capacity);
  const int64_t pages = kv_by_request_ ? PagesFor(kv_tokens) : int64_t{seq_pages} * max_sequences;
  EE_CHECK(pages * kKvPageTokens <= (int64_t{1} << 31) - 1, "a KV cache of ", pages * kKvPageTokens,
           " tokens");
  kv_pages_ = static_cast<int>(pages);
  const size_t rows = static_cast<size_t>(pages) * kKvPageTokens;
  // The pools: per local layer (and local block exit) K and V, and the pending rows' hidden
  // states; each sequence holds pages of them.
  kv_row_ = static_cast<size_t>(local.num_kv_heads) * local.head_dim();
  for (int l = first_; l < end_; ++l) {
    pool_kv_.push_back(KvLayer{arena_.Operands(rows * kv_row_), arena_.Operands(rows * kv_row_)});
  }
  for (size_t i = 0; i < c.exits.size(); ++i) {
    KvLayer kv;
    if (c.exits[i].kind == ExitKind::kBlock && model->ExitIsLocal(static_cast<int>(i))) {
      kv = KvLayer{arena_.Operands(rows * kv_row_), arena_.Operands(rows * kv_row_)};
    }
    pool_exit_kv_.push_back(kv);
  }
  pool_frontier_ = arena_.Floats(rows * ch);
  device_pages_ = arena_.Ints(static_cast<size_t>(max_sequences) * seq_pages);
  seqs_.resize(max_sequences);
  for (int s = 0; s < max_sequences; ++s) {
    Sequence& q = seqs_[s];
    q.depth.assign(capacity, 0);
    q.pages.reserve(seq_pages);  // never reallocated: the table points at it
    q.table = {q.pages.data(), device_pages_ + static_cast<size_t>(s) * seq_pages, kKvPageTokens};
    for (const KvLayer& pool : pool_kv_) q.kv.push_back({pool.k, pool.v, &q.table});
    for (const KvLayer& pool : pool_exit_kv_) q.exit_kv.push_back({pool.k, pool.v, &q.table});
    if (kv_by_request_) continue;
    std::vector<int32_t> own(seq_pages);  // a whole context each, for good
    for (int p = 0; p < seq_pages; ++p) own[p] = s * seq_pages + p;
    SetPages(q, own);
  }
  if (kv_by_request_) page_pool_ = KvPagePool(kv_pages_);
  for (size_t i = 0; i < c.exits.size(); ++i) {
    exit_acts_.push_back(model->ExitIsLocal(static_cast<int>(i))
                             ? model->MakeExitActs(arena_, i, row_budget_, /*training=*/false)
                             : ExitActs{});
  }
  acts_ = MakeBlockActs(arena_, local, row_budget_, /*training=*/false);
  final_norm_ = MakeNormActs(arena_, head_rows_, c.hidden_size);
  work_ = arena_.Floats(row_budget_ * ch);
  packed_ = arena_.Floats(row_budget_ * ch);
  newest_ = arena_.Floats(head_rows_ * ch);
  newest_ops_ = arena_.Operands(max_sequences * ch);
  logits_ = arena_.Floats(static_cast<size_t>(head_rows_) * local.vocab_size);  // this rank's
  if (model->tp().size > 1) {
    gathered_logits_ = arena_.Floats(static_cast<size_t>(head_rows_) * c.vocab_size);
  }
  pos_ = arena_.Ints(capacity);
  packed_pos_ = arena_.Ints(row_budget_);
  work_pos_ = arena_.Ints(row_budget_);
  staged_ids_ = arena_.Ints(static_cast<size_t>(max_sequences) * capacity);
  std::vector<int32_t> pos(capacity);
  for (int i = 0; i < capacity; ++i) pos[i] = i;
  be_->CopyFromHost(pos_, pos.data(), capacity * sizeof(int32_t));
}

void Generator::SetPages(Sequence& q, const std::vector<int32_t>& pages) {
  EE_CHECK(static_cast<int>(pages.size()) <= PagesFor(capacity_), pages.size(),
           " KV pages for a sequence of at most ", PagesFor(capacity_));
  for (int32_t p : pages) EE_CHECK(p >= 0 && p < kv_pages_, "KV page ", p, " of ", kv_pages_);
  q.pages.assign(pages.begin(), pages.end());
  SyncPageTable(q, 0);
}

void Generator::SyncPageTable(Sequence& q, size_t first) {
  q.table.count = static_cast<int>(q.pages.size());
  int32_t* device = device_pages_ + (&q - seqs_.data()) * PagesFor(capacity_);
  be_->CopyFromHost(device + first, q.pages.data() + first,
                    (q.pages.size() - first) * sizeof(int32_t));
}

bool Generator::GrowKv(Sequence& q, int tokens) {
  EE_CHECK(tokens <= capacity_, "KV pages for ", tokens, " tokens, the context is ", capacity_);
  const int need = PagesFor(tokens) - static_cast<int>(q.pages.size());
  if (need <= 0) return true;
  if (need > page_pool_.free()) return false;
  const size_t first = q.pages.size();
  for (int k = 0; k < need; ++k) {
    // The page after its last keeps its rows adjacent (one product per run of pages).
    q.pages.push_back(page_pool_.Take(q.pages.empty() ? -1 : q.pages.back() + 1));
  }
  SyncPageTable(q, first);
  return true;
}

void Generator::SetPrefillChunk(int tokens) {
  EE_CHECK(tokens >= 0, "a prefill chunk of ", tokens, " tokens");
  prefill_chunk_ = tokens;
}

void Generator::RegisterCompletePages(int slot) {
  if (prefix_caching_) RegisterPages(seqs_.at(slot));
}

void Generator::EnablePrefixCaching() {
  EE_CHECK(kv_by_request_, "prefix caching needs a shared KV cache (kv_tokens > 0)");
  prefix_caching_ = true;
}

std::vector<int32_t> Generator::CachedPrefix(const GenerationRequest& r,
                                             const std::vector<int32_t>& tokens,
                                             bool scoring) const {
  std::vector<int32_t> pages;
  if (!prefix_caching_ || scoring) return pages;
  const bool exit_kv = block_exits_ && KeepsExitKv(r);
  int32_t parent = -1;
  // Whole pages of all but the last token: the prefill computes at least one row (its newest).
  for (size_t i = 0; (i + 1) * kKvPageTokens < tokens.size(); ++i) {
    parent = page_pool_.Find(parent, tokens.data() + i * kKvPageTokens, exit_kv);
    if (parent < 0) break;
    pages.push_back(parent);
  }
  return pages;
}

int Generator::PagesToStart(const GenerationRequest& r, const std::vector<int32_t>& tokens,
                            int reserve, bool scoring) const {
  int held = 0;
  for (int32_t p : CachedPrefix(r, tokens, scoring)) held += page_pool_.holders(p) > 0;
  return PagesFor(reserve) - held;
}

int Generator::UseCachedPrefix(Sequence& q) {
  EE_CHECK(q.pages.empty() && q.len == 0, "a cached prefix for a sequence that holds pages");
  q.registered_pages = 0;
  const std::vector<int32_t> pages =
      CachedPrefix(q.request, q.next, q.request.prompt_logprobs && !q.prefilled);
  if (pages.empty()) return 0;
  for (int32_t p : pages) page_pool_.Hold(p);
  q.pages.assign(pages.begin(), pages.end());
  SyncPageTable(q, 0);
  const int n = static_cast<int>(pages.size()) * kKvPageTokens;
  q.len = q.pending_start = n;
  std::fill(q.depth.begin(), q.depth.begin() + n, end_);
  q.next.erase(q.next.begin(), q.next.begin() + n);
  q.registered_pages = static_cast<int>(pages.size());
  prefix_cached_tokens_ += n;
  if (!q.prefilled) q.result.cached_prompt_tokens = n;  // resumed before its first pass: again
  return n;
}

void Generator::RegisterPages(Sequence& q) {
  const std::vector<int32_t>& prompt = q.request.prompt;
  const int np = static_cast<int>(prompt.size());
  // Complete rows whose tokens are kept: the prompt's and the emitted tokens' (not drafts).
  const int complete =
      std::min({q.pending_start, q.len, np + static_cast<int>(q.result.tokens.size())});
  int32_t ids[kKvPageTokens];
  for (int i = q.registered_pages; i < complete / kKvPageTokens; ++i) {
    for (int k = 0; k < kKvPageTokens; ++k) {
      const int p = i * kKvPageTokens + k;
      ids[k] = p < np ? prompt[p] : q.result.tokens[p - np];
    }
    const int32_t parent = i > 0 ? q.pages[i - 1] : -1;
    if (!page_pool_.registered(q.pages[i]) &&
        !page_pool_.Register(q.pages[i], parent, ids, KeepsExitKv(q.request))) {
      // Another page holds the same K/V already (e.g. identical prompts prefilled in one pass),
      // with the block exits' when this sequence needs them: the sequence holds that one
      // instead and frees its own, and its later pages are registered after it. Or its parent
      // is no longer registered (a page with the block exits' K/V replaced it): its later pages
      // follow one that cannot be found, so they are not registered.
      const int32_t same = keep_pages_ ? -1 : page_pool_.Find(parent, ids, /*need_exit_kv=*/false);
      if (same < 0) {
        q.registered_pages = PagesFor(capacity_);
        return;
      }
      page_pool_.Hold(same);
      page_pool_.Release(q.pages[i], passes_, i);
      q.pages[i] = same;
      SyncPageTable(q, i);
    }
    q.registered_pages = i + 1;
  }
}

std::vector<float> Generator::KvToHost(int layer, int seq, bool values) const {
  const Sequence& q = seqs_.at(seq);
  const KvLayer& kv = q.kv.at(layer - first_);
  std::vector<float> out(q.len * kv_row_);
  for (const PageRun& r : PageRuns(q.table, 0, q.len)) {
    OperandToHost(be_, out.data() + r.pos * kv_row_, (values ? kv.v : kv.k).At(r.row * kv_row_),
                  r.count * kv_row_);
  }
  return out;
}

void Generator::Reset() {
  for (Sequence& q : seqs_) {
    q.busy = false;
    q.request = GenerationRequest();
    ReleaseKv(q);
    q.len = q.pending_start = 0;
    std::fill(q.depth.begin(), q.depth.end(), 0);
  }
}

int Generator::length(int seq) const { return seqs_.at(seq).len; }
int Generator::pending_start(int seq) const { return seqs_.at(seq).pending_start; }

bool Generator::ExitAllowed(int i, const EarlyExitParams& ee) const {
  if (ee.exit_layers.empty()) return true;
  const int layer = model_->config().exits[i].layer;
  return std::find(ee.exit_layers.begin(), ee.exit_layers.end(), layer) != ee.exit_layers.end();
}

std::vector<StepResult> Generator::StepBatch(const std::vector<std::vector<int32_t>>& ids,
                                             const std::vector<EarlyExitParams>& ee) {
  return Pass(ids, ee, {});
}

std::vector<StepResult> Generator::Pass(const std::vector<std::vector<int32_t>>& ids,
                                        const std::vector<EarlyExitParams>& ee,
                                        const std::vector<bool>& check,
                                        const std::vector<bool>& partial) {
  EE_CHECK(ids.size() <= seqs_.size() && ee.size() == ids.size() &&
               (check.empty() || check.size() == ids.size()),
           "a pass: ", ids.size(), " sequences, ", ee.size(), " exit settings, ", check.size(),
           " checks, room for ", seqs_.size());
  std::vector<StepResult> out(ids.size());
  std::vector<Item> items;
  std::vector<int32_t> staged;  // every new id, copied to the device at once
  std::vector<size_t> offsets;
  for (size_t s = 0; s < ids.size(); ++s) {
    if (ids[s].empty()) continue;
    Sequence& q = seqs_[s];
    const int n = static_cast<int>(ids[s].size());
    EE_CHECK(q.len + n <= q.table.tokens(), "sequence ", s, " would hold ", q.len + n,
             " tokens, its KV pages hold ", q.table.tokens());
    offsets.push_back(staged.size());
    staged.insert(staged.end(), ids[s].begin(), ids[s].end());
    // A speculative sequence keeps its block exits' K/V in every pass: its drafts attend to them.
    q.checks_exits = ee[s].threshold < 1.0f || q.speculative();
    Item it;
    it.seq = static_cast<int>(s);
    it.n_new = n;
    it.ee = ee[s].threshold < 1.0f ? &ee[s] : nullptr;
    it.out = &out[s];
    it.all_rows = !check.empty() && check[s];
    if (!partial.empty() && partial[s]) {
      it.ee = nullptr;
      it.no_head = true;
    }
    if (q.busy && q.request.prompt_logprobs && !q.prefilled) {  // a prefill that scores its prompt
      it.score_ids = q.request.prompt.data();  // by position: chunks score their own rows
      it.score_top = q.request.top_logprobs;
      it.ee = nullptr;  // every row reaches the final head, which decides the first token
    }
    items.push_back(it);
  }
  be_->CopyFromHost(staged_ids_, staged.data(), staged.size() * sizeof(int32_t));
  for (size_t i = 0; i < items.size(); ++i) items[i].new_ids = staged_ids_ + offsets[i];
  CountPass(static_cast<int>(items.size()));
  Forward(items);
  return out;
}

StepResult Generator::Step(const std::vector<int32_t>& ids, const EarlyExitParams& ee) {
  return StepBatch({ids}, {ee})[0];
}

std::vector<StepResult> Generator::StagePass(const std::vector<StageItem>& items,
                                             const int32_t* ids, const float* hidden) {
  EE_CHECK((ids != nullptr) == model_->is_first_stage() && (hidden != nullptr) != (ids != nullptr),
           "StagePass: the first stage takes token ids, later stages hidden states");
  const size_t ch = model_->config().hidden_size;
  std::vector<StepResult> out(items.size());
  std::vector<Item> its(items.size());
  int rows = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    const StageItem& si = items[k];
    Sequence& q = seqs_.at(si.seq);
    if (!si.kv_pages.empty()) {  // a new sequence in this slot, in the KV pages the leader gave
      SetPages(q, si.kv_pages);  // it; the first `start` positions hold a cached prefix's K/V
      q.len = q.pending_start = si.start;
    }
    EE_CHECK(si.n > 0 && q.len == si.start && q.pending_start == q.len &&
                 q.len + si.n <= q.table.tokens(),
             "StagePass: sequence ", si.seq, " holds ", q.len, " tokens (", q.len - q.pending_start,
             " pending), the pass appends ", si.n, " at ", si.start, ", KV room ",
             q.table.tokens());
    q.checks_exits = si.early_exit.threshold < 1.0f;
    Item& it = its[k];
    it.seq = si.seq;
    it.n_new = si.n;
    it.ee = si.live && q.checks_exits && si.score_ids.empty() ? &si.early_exit : nullptr;
    it.out = &out[k];
    if (!si.score_ids.empty() && model_->is_last_stage()) {
      EE_CHECK(si.start + si.n <= static_cast<int>(si.score_ids.size()), "StagePass: sequence ",
               si.seq, " scores a prompt of ", si.score_ids.size(), " tokens in a pass of ", si.n,
               " at ", si.start);
      it.score_ids = si.score_ids.data();
      it.score_top = si.score_top;
    }
    it.fired = !si.live;
    it.keep_going = true;
    if (si.partial) {
      it.ee = nullptr;
      it.no_head = true;
    }
    if (ids != nullptr) {
      it.new_ids = staged_ids_ + rows;
    } else {
      it.new_hidden = hidden + rows * ch;
    }
    rows += si.n;
  }
  EE_CHECK(rows <= row_budget_, "StagePass: ", rows, " rows, room for ", row_budget_);
  if (ids != nullptr) be_->CopyFromHost(staged_ids_, ids, rows * sizeof(int32_t));
  CountPass(static_cast<int>(its.size()));
  if (!its.empty()) ForwardGroup(its.data(), static_cast<int>(its.size()));
  return out;
}

void Generator::CountPass(int sequences) {
  if (sequences == 0) return;
  ++passes_;
  largest_pass_ = std::max(largest_pass_, sequences);
}

void Generator::FinishPending() {
  std::vector<Item> items;
  std::vector<StepResult> unused(seqs_.size());
  for (size_t s = 0; s < seqs_.size(); ++s) {
    if (seqs_[s].pending_start == seqs_[s].len) continue;
    Item it;
    it.seq = static_cast<int>(s);
    it.out = &unused[s];
    items.push_back(it);
  }
  Forward(items);
}

void Generator::Forward(std::vector<Item>& items) {
  // Groups of consecutive items whose rows fit the work buffers (one item always fits).
  size_t begin = 0;
  int rows = 0;
  for (size_t i = 0; i <= items.size(); ++i) {
    const int r = i < items.size()
                      ? seqs_[items[i].seq].len - seqs_[items[i].seq].pending_start + items[i].n_new
                      : 0;
    if (i == items.size() || (i > begin && rows + r > row_budget_)) {
      if (i > begin) ForwardGroup(&items[begin], static_cast<int>(i - begin));
      begin = i;
      rows = 0;
    }
    rows += r;
  }
}

Generator::Packed Generator::Pack(std::vector<Piece>& pieces) {
  const size_t ch = model_->config().hidden_size;
  auto work_row = [&](const Piece& p) { return p.item->work_row + p.first - p.item->start; };
  bool adjacent = true;
  for (size_t k = 1; k < pieces.size(); ++k) {
    adjacent &= work_row(pieces[k - 1]) + pieces[k - 1].rows == work_row(pieces[k]);
  }
  if (adjacent) {  // the rows already lie together in the work buffer: no copies
    const int first = work_row(pieces[0]);
    for (Piece& p : pieces) p.packed = work_row(p) - first;
    return {work_ + first * ch, work_pos_ + first, first};
  }
  int row = 0;
  for (Piece& p : pieces) {
    p.packed = row;
    be_->Copy(packed_ + p.packed * ch, work_ + work_row(p) * ch, p.rows * ch * sizeof(float));
    be_->Copy(packed_pos_ + p.packed, work_pos_ + work_row(p), p.rows * sizeof(int32_t));
    row += p.rows;
  }
  return {packed_, packed_pos_, -1};
}

void Generator::set_token_limit(int tokens) {
  EE_CHECK(tokens > 0 && tokens <= model_->config().vocab_size, "token limit ", tokens,
           " outside [1, ", model_->config().vocab_size, "]");
  token_limit_ = tokens;
}

const std::vector<float>& Generator::ProjectToHost(ConstOperand rows, int exit_index, int k) {
  const size_t vocab = model_->config().vocab_size;
  model_->Project(logits_, rows, exit_index, k);
  host_logits_.resize(k * vocab);
  // Padded ids (set_token_limit) get no probability.
  auto mask_padding = [&] {
    if (static_cast<size_t>(token_limit_) == vocab) return;
    for (int j = 0; j < k; ++j) {
      std::fill(host_logits_.begin() + static_cast<size_t>(j) * vocab + token_limit_,
                host_logits_.begin() + static_cast<size_t>(j + 1) * vocab,
                -std::numeric_limits<float>::infinity());
    }
  };
  const TpSpec& tp = model_->tp();
  if (tp.size == 1) {
    be_->CopyToHost(host_logits_.data(), logits_, k * vocab * sizeof(float));
    mask_padding();
    return host_logits_;
  }
  // Each rank projected its vocabulary shard, [k, vocab / tp]; gather them ([tp, k, vocab / tp])
  // and lay each row out whole. Every rank then holds the same bytes, so every rank makes the
  // same exit and sampling decisions.
  const size_t part = vocab / tp.size;
  tp.comm->AllGather(logits_, gathered_logits_, k * part);
  std::vector<float> g(k * vocab);
  be_->CopyToHost(g.data(), gathered_logits_, k * vocab * sizeof(float));
  for (int r = 0; r < tp.size; ++r) {
    const VocabShard shard = ShardOfVocab(static_cast<int>(vocab), r, tp.size);
    EE_CHECK(static_cast<size_t>(shard.rows) == part, "uneven vocabulary shards");
    for (int j = 0; j < k; ++j) {
      std::copy_n(g.data() + (static_cast<size_t>(r) * k + j) * part, part,
                  host_logits_.data() + static_cast<size_t>(j) * vocab + shard.start);
    }
  }
  mask_padding();
  return host_logits_;
}

void Generator::CheckExits(int depth, const std::vector<Piece>& pieces, const float* in,
                           const int32_t* pos) {
  const ModelConfig& c = model_->config();
  const size_t ch = c.hidden_size;
  const int vocab = c.vocab_size;
  for (size_t i = 0; i < c.exits.size(); ++i) {
    const ExitConfig& x = c.exits[i];
    const int ii = static_cast<int>(i);
    if (x.depth() != depth || !model_->ExitIsLocal(ii)) continue;
    // Pieces whose newest row checks this exit (every piece ends at its item's newest row).
    std::vector<const Piece*> checked;
    for (const Piece& p : pieces) {
      const Item& it = *p.item;
      if (!it.fired && it.ee != nullptr && ExitAllowed(ii, *it.ee)) checked.push_back(&p);
    }
    int k = 0;
    ConstOperand last;
    if (x.kind == ExitKind::kBlock) {
      // The exit's own block needs K/V for every row that reaches its depth; they are kept
      // for every sequence of a pass in which any sequence checks exits.
      bool any = false;
      for (const Piece& p : pieces) any |= seqs_[p.item->seq].checks_exits;
      if (!any) continue;
      std::vector<KvSegment> segs;
      for (const Piece& p : pieces) {
        segs.push_back({&seqs_[p.item->seq].exit_kv[i], p.packed, p.rows, p.first});
      }
      const int total = pieces.back().packed + pieces.back().rows;
      const ConstOperand h = model_->ExitHidden(ii, exit_acts_[i], in, pos, 1, total, &segs);
      const size_t row_bytes = ch * DTypeSize(h.dtype);
      for (const Piece* p : checked) {
        be_->Copy(newest_ops_.At(k++ * ch).data, h.At((p->packed + p->rows - 1) * ch).data,
                  row_bytes);
      }
      last = newest_ops_;
    } else {
      const float* src =
          x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost ? acts_.h_attn : in;
      for (const Piece* p : checked) {
        be_->Copy(newest_ + k++ * ch, src + (p->packed + p->rows - 1) * ch, ch * sizeof(float));
      }
      if (k > 0) last = model_->ExitHidden(ii, exit_acts_[i], newest_, pos_, 1, k, nullptr);
    }
    if (k == 0) continue;
    const std::vector<float>& logits = ProjectToHost(last, ii, k);
    for (int j = 0; j < k; ++j) {
      Item& it = *checked[j]->item;
      const float* row = logits.data() + static_cast<size_t>(j) * vocab;
      if (MaxProbability(row, vocab, x.temperature) < it.ee->threshold) continue;
      it.fired = true;
      it.out->exit_index = ii;
      it.out->temperature = x.temperature;
      it.out->depth = depth;
      it.out->logits.assign(row, row + vocab);
    }
  }
}

void Generator::ForwardGroup(Item* items, int n) {
  const ModelConfig& c = model_->config();
  const size_t ch = c.hidden_size;
  int row = 0;
  std::vector<Piece> pieces;
  std::vector<int32_t> work_pos;  // positions of the work buffer's rows
  for (int i = 0; i < n; ++i) {
    Item& it = items[i];
    Sequence& q = seqs_[it.seq];
    const int old_len = q.len;
    it.start = q.pending_start;
    it.end = old_len + it.n_new;
    it.work_row = row;
    // Pending rows resume from their stored hidden state; new rows start from embeddings.
    CopyFromPages(be_, work_ + row * ch, pool_frontier_, q.table, it.start, old_len - it.start,
                  ch * sizeof(float));
    if (it.n_new > 0) {
      float* dst = work_ + (row + old_len - it.start) * ch;
      if (it.new_hidden != nullptr) {
        be_->CopyFromHost(dst, it.new_hidden, it.n_new * ch * sizeof(float));
      } else {
        // Learned positions have rows for max_seq_len positions only (Embed reads them on the
        // device unchecked).
        const ModelConfig& mc = model_->config();
        EE_CHECK(!mc.learned_positions() || old_len + it.n_new <= mc.max_seq_len, "position ",
                 old_len + it.n_new - 1, " is past the model's max_seq_len ", mc.max_seq_len,
                 " (learned positions)");
        model_->Embed(dst, it.new_ids, pos_ + old_len, it.n_new);
      }
      pieces.push_back({&it, old_len, it.n_new});
    }
    for (int p = old_len; p < it.end; ++p) q.depth[p] = first_;
    for (int p = it.start; p < it.end; ++p) work_pos.push_back(p);
    q.len = it.end;
    row += it.end - it.start;
  }
  be_->CopyFromHost(work_pos_, work_pos.data(), row * sizeof(int32_t));
  if (!pieces.empty()) {
    const Packed in = Pack(pieces);
    CheckExits(first_, pieces, in.rows, in.pos);
  }
  for (int l = first_ + 1; l <= end_; ++l) {
    pieces.clear();
    for (int i = 0; i < n; ++i) {
      Item& it = items[i];
      if (it.fired && !it.keep_going) continue;
      const Sequence& q = seqs_[it.seq];
      int m = it.start;
      while (m < it.end && q.depth[m] >= l) ++m;
      if (m < it.end) pieces.push_back({&it, m, it.end - m});
    }
    if (pieces.empty()) continue;
    const Packed x = Pack(pieces);
    std::vector<KvSegment> segs;
    for (const Piece& p : pieces) {
      segs.push_back({&seqs_[p.item->seq].kv[l - 1 - first_], p.packed, p.rows, p.first});
    }
    const int total = pieces.back().packed + pieces.back().rows;
    BlockForward(model_->ctx(), model_->layer(l - 1), acts_, x.rows, x.pos, 1, total, &segs);
    if (x.work_row >= 0) {
      be_->Copy(work_ + x.work_row * ch, acts_.out, total * ch * sizeof(float));
    }
    for (const Piece& p : pieces) {
      const Item& it = *p.item;
      if (x.work_row < 0) {
        be_->Copy(work_ + (it.work_row + p.first - it.start) * ch, acts_.out + p.packed * ch,
                  p.rows * ch * sizeof(float));
      }
      Sequence& q = seqs_[it.seq];
      for (int r = p.first; r < it.end; ++r) q.depth[r] = l;
    }
    CheckExits(l, pieces, acts_.out, x.pos);
  }
  for (int i = 0; i < n; ++i) {
    if (items[i].score_ids != nullptr) ScorePrompt(items[i]);
  }
  // The final head (on the last stage), for the newest rows of sequences no exit took, and every
  // row of those whose drafts it checks; in projections of at most head_rows_ rows.
  std::vector<Piece> finals;  // first: the item's first scored row in work_
  for (int i = 0; i < n && model_->is_last_stage(); ++i) {
    Item& it = items[i];
    if (it.fired || it.no_head || (it.n_new == 0 && !it.all_rows)) continue;
    const int rows = it.all_rows ? it.end - it.start : 1;
    EE_CHECK(rows <= head_rows_, "the final head scores ", rows, " rows, room for ", head_rows_);
    finals.push_back({&it, it.work_row + it.end - it.start - rows, rows});
  }
  for (size_t f = 0; f < finals.size();) {
    size_t g = f;
    int k = 0;
    for (; g < finals.size() && k + finals[g].rows <= head_rows_; k += finals[g++].rows) {
      be_->Copy(newest_ + k * ch, work_ + finals[g].first * ch,
                finals[g].rows * ch * sizeof(float));
    }
    const std::vector<float>& logits =
        ProjectToHost(model_->FinalHidden(final_norm_, newest_, k), -1, k);
    for (const float* r = logits.data(); f < g; r += finals[f++].rows * c.vocab_size) {
      finals[f].item->out->logits.assign(r, r + finals[f].rows * c.vocab_size);
      finals[f].item->out->rows = finals[f].rows;
      finals[f].item->out->depth = c.num_layers;
    }
  }
  for (int i = 0; i < n; ++i) {
    const Item& it = items[i];
    Sequence& q = seqs_[it.seq];
    if (q.depth[it.end - 1] == end_) {
      q.pending_start = it.end;
    } else {
      CopyToPages(be_, pool_frontier_, q.table, it.start, it.end - it.start,
                  work_ + it.work_row * ch, ch * sizeof(float), ch * sizeof(float));
    }
  }
}

void Generator::ScorePrompt(Item& it) {
  const size_t ch = model_->config().hidden_size;
  const int vocab = model_->config().vocab_size;
  EE_CHECK(model_->is_last_stage(), "ScorePrompt: not the last stage");
  // The row at position p predicts prompt token p + 1: every row of a chunk before the last,
  // all but the newest of the last (which predicts the first generated token).
  const int end = it.no_head ? it.end : it.end - 1;
  for (int first = it.start; first < end; first += head_rows_) {
    const int k = std::min(head_rows_, end - first);
    be_->Copy(newest_, work_ + (it.work_row + first - it.start) * ch, k * ch * sizeof(float));
    const std::vector<float>& logits =
        ProjectToHost(model_->FinalHidden(final_norm_, newest_, k), -1, k);
    for (int j = 0; j < k; ++j) {
      const float* row = logits.data() + static_cast<size_t>(j) * vocab;
      it.out->prompt_logprobs.push_back(LogProbability(row, vocab, it.score_ids[first + j + 1]));
      if (it.score_top > 0) {
        it.out->prompt_top.push_back(TopLogProbabilities(row, vocab, it.score_top));
      }
    }
  }
}

}  // namespace eellm
