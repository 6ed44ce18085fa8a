#include "models/pipeline_generator.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/core/timer.h"

namespace eellm {
namespace {

using StageItem = Generator::StageItem;

constexpr int kPassTag = 7101;      // a stage's output, to the next stage
constexpr int kPlanTag = 7102;      // the leader's pass, to stage 0's tensor-parallel peers
constexpr int kDecisionTag = 7103;  // heads' decisions, to the leader

// A message's bytes, written in order: int32 and float fields, then arrays of them.
class Writer {
 public:
  template <typename T>
  void Put(T v) {
    std::memcpy(Grow<T>(1), &v, sizeof(T));
  }
  // Room for n values at the end, to fill.
  template <typename T>
  T* Grow(size_t n) {
    const size_t at = bytes_.size();
    bytes_.resize(at + n * sizeof(T));
    return reinterpret_cast<T*>(bytes_.data() + at);
  }
  // An int32 array: its length, then its values.
  void PutInts(const std::vector<int32_t>& v) {
    Put<int32_t>(static_cast<int32_t>(v.size()));
    std::copy(v.begin(), v.end(), Grow<int32_t>(v.size()));
  }
  std::vector<char> Take() { return std::move(bytes_); }

 private:
  std::vector<char> bytes_;
};

class Reader {
 public:
  explicit Reader(const std::vector<char>& bytes) : bytes_(bytes) {}
  template <typename T>
  T Get() {
    T v;
    std::memcpy(&v, Array<T>(1), sizeof(T));
    return v;
  }
  template <typename T>
  const T* Array(size_t n) {
    EE_CHECK(pos_ + n * sizeof(T) <= bytes_.size(), "pipeline message of ", bytes_.size(),
             " bytes is truncated");
    const T* p = reinterpret_cast<const T*>(bytes_.data() + pos_);
    pos_ += n * sizeof(T);
    return p;
  }
  std::vector<int32_t> Ints() {  // what Writer::PutInts wrote
    const int n = Get<int32_t>();
    const int32_t* p = Array<int32_t>(n);
    return {p, p + n};
  }

 private:
  const std::vector<char>& bytes_;
  size_t pos_ = 0;
};

// Between two tests of a receive that has not completed: yields at first (a pass's messages
// follow each other closely, and a sleep costs ~80 us of wake-up latency each time), then
// sleeps, longer once idle for a while (a serving pipeline without requests does not keep its
// cores busy).
void Backoff(int& spins) {
  if (spins < 4096) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(spins < 20000 ? 20 : 1000));
  }
  spins = std::min(spins + 1, 20000);
}

// The next message from `peer`; empty when the peer stops.
std::vector<char> Receive(Communicator* comm, int peer, int tag) {
  int64_t size = 0;
  std::unique_ptr<Request> head = comm->IRecv(&size, sizeof(size), peer, tag);
  for (int spins = 0; !head->Test();) Backoff(spins);
  std::vector<char> bytes(size);
  if (size > 0) comm->Recv(bytes.data(), bytes.size(), peer, tag);
  return bytes;
}

int Rows(const std::vector<StageItem>& items) {
  int rows = 0;
  for (const StageItem& it : items) rows += it.n;
  return rows;
}

// A pass: its items, then `width` values of type T per row (token ids or hidden states), whose
// room is returned to fill.
template <typename T>
std::pair<Writer, T*> EncodePass(const std::vector<StageItem>& items, size_t width) {
  std::pair<Writer, T*> m;
  Writer& w = m.first;
  w.Put<int32_t>(static_cast<int32_t>(items.size()));
  for (const StageItem& it : items) {
    w.Put<int32_t>(it.seq);
    w.Put<int32_t>(it.start);
    w.Put<int32_t>(it.n);
    w.Put<int32_t>(it.live);
    w.Put<int32_t>(it.partial);
    w.PutInts(it.kv_pages);
    w.Put<float>(it.early_exit.threshold);
    w.PutInts(it.early_exit.exit_layers);
    w.Put<int32_t>(it.score_top);
    w.PutInts(it.score_ids);
  }
  m.second = w.Grow<T>(Rows(items) * width);
  return m;
}

std::vector<StageItem> DecodeItems(Reader& r) {
  std::vector<StageItem> items(r.Get<int32_t>());
  for (StageItem& it : items) {
    it.seq = r.Get<int32_t>();
    it.start = r.Get<int32_t>();
    it.n = r.Get<int32_t>();
    it.live = r.Get<int32_t>() != 0;
    it.partial = r.Get<int32_t>() != 0;
    it.kv_pages = r.Ints();
    it.early_exit.threshold = r.Get<float>();
    it.early_exit.exit_layers = r.Ints();
    it.score_top = r.Get<int32_t>();
    it.score_ids = r.Ints();
  }
  return items;
}

// A decision's prompt scores (a scoring prefill's, from the last stage; else none): the count,
// the most likely tokens per position, then the log-probabilities and the (id, log-probability)
// pairs.
void WritePromptScores(const StepResult& r, Writer* w) {
  const int n = static_cast<int>(r.prompt_logprobs.size());
  const int top = r.prompt_top.empty() ? 0 : static_cast<int>(r.prompt_top[0].size());
  w->Put<int32_t>(n);
  w->Put<int32_t>(top);
  std::copy_n(r.prompt_logprobs.data(), n, w->Grow<float>(n));
  for (int p = 0; p < n && top > 0; ++p) {
    for (const auto& [id, lp] : r.prompt_top[p]) {
      w->Put<int32_t>(id);
      w->Put<float>(lp);
    }
  }
}

void ReadPromptScores(Reader& r, StepResult* s) {
  const int n = r.Get<int32_t>(), top = r.Get<int32_t>();
  const float* lp = r.Array<float>(n);
  s->prompt_logprobs.assign(lp, lp + n);
  for (int p = 0; p < n && top > 0; ++p) {
    TopTokens t(top);
    for (auto& [id, value] : t) {
      id = r.Get<int32_t>();
      value = r.Get<float>();
    }
    s->prompt_top.push_back(std::move(t));
  }
}

}  // namespace

// Posts sends without blocking and keeps each message until it has gone. A message is its size
// (int64; 0 means "stop") followed by its bytes.
class Outbox {
 public:
  explicit Outbox(Communicator* comm) : comm_(comm) {}
  ~Outbox() { Flush(); }
  void Send(int peer, int tag, std::vector<char> bytes) {
    auto m = std::make_unique<Message>();
    m->size = static_cast<int64_t>(bytes.size());
    m->bytes = std::move(bytes);
    m->head = comm_->ISend(&m->size, sizeof(m->size), peer, tag);
    if (m->size > 0) m->body = comm_->ISend(m->bytes.data(), m->bytes.size(), peer, tag);
    sent_.push_back(std::move(m));
    while (!sent_.empty() && sent_.front()->Gone()) sent_.pop_front();
  }
  void Flush() {
    for (auto& m : sent_) {
      m->head->Wait();
      if (m->body) m->body->Wait();
    }
    sent_.clear();
  }

 private:
  struct Message {
    int64_t size = 0;
    std::vector<char> bytes;
    std::unique_ptr<Request> head, body;
    bool Gone() { return head->Test() && (!body || body->Test()); }
  };
  Communicator* comm_;
  std::deque<std::unique_ptr<Message>> sent_;
};

PipelineGenerator::PipelineGenerator(Generator* stage_generator, Communicator* world, int stages,
                                     int tp)
    : gen_(stage_generator), world_(world), stages_(stages), tp_(tp) {
  EE_CHECK(stages >= 1 && tp >= 1 && world->size() == stages * tp, "pipeline of ", stages,
           " stages x tp ", tp, " over ", world->size(), " ranks");
  stage_ = world->rank() / tp;
  tp_rank_ = world->rank() % tp;
  // A sequence's pages are given at its admission: its first pass carries them to every stage,
  // which then hold copies of its page table.
  gen_->ReserveKvPerRequest();
  gen_->KeepPagesWhileRunning();
}

PipelineGenerator::~PipelineGenerator() {
  if (started_) Stop();  // the other ranks return, and no receive is left posted
}

absl::StatusOr<std::vector<GenerationResult>> PipelineGenerator::GenerateBatch(
    const std::vector<GenerationRequest>& requests,
    const std::function<void(int, int32_t)>& on_token) {
  RETURN_IF_ERROR(ValidateBatch(*this, requests));
  if (!leader()) {
    Work();
    return std::vector<GenerationResult>();
  }
  std::vector<GenerationResult> results = GenerateAll(*this, requests, on_token);
  Stop();
  return results;
}

void PipelineGenerator::Start() {
  if (started_) return;
  started_ = true;
  if (outbox_ == nullptr) outbox_ = std::make_unique<Outbox>(world_);
  passes_sent_ = passes_done_ = 0;
  stats_.most_in_flight_of_one = 0;
  in_flight_.assign(gen_->max_sequences(), 0);
  deciding_.assign(gen_->max_sequences(), 0);
  abandoned_.assign(gen_->max_sequences(), 0);
  inbox_.clear();
  inbox_.resize(stages_);
  for (int d = 1; d < stages_; ++d) {
    inbox_[d].request = world_->IRecv(&inbox_[d].size, sizeof(int64_t), Rank(d, 0), kDecisionTag);
  }
}

absl::StatusOr<int> PipelineGenerator::Admit(GenerationRequest request) {
  EE_CHECK(leader(), "Admit on a rank that does not lead the pipeline");
  Start();
  for (int s = 0; s < gen_->max_sequences(); ++s) {
    if (!gen_->busy(s) && !in_flight_[s]) return gen_->Admit(std::move(request), s);
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", gen_->max_sequences(), " sequence slots are taken"));
}

int PipelineGenerator::free_slots() const {
  int n = 0;
  for (int s = 0; s < gen_->max_sequences(); ++s) {
    n += !gen_->busy(s) && (!started_ || !in_flight_[s]);
  }
  return n;
}

GenerationResult PipelineGenerator::Retire(int slot) {
  if (started_ && in_flight_[slot] > 0) abandoned_[slot] = 1;
  return gen_->Retire(slot);
}

void PipelineGenerator::Take(int slot, const StepResult& r,
                             const std::function<void(int, int32_t)>& on_token,
                             std::vector<FinishedSequence>* finished) {
  --in_flight_[slot];
  if (!r.logits.empty()) deciding_[slot] = 0;
  if (abandoned_[slot]) {  // retired meanwhile
    if (in_flight_[slot] == 0) abandoned_[slot] = 0;
    return;
  }
  // A chunk's answer after the sequence's token was decided on an earlier stage (and it finished).
  if (!gen_->busy(slot)) return;
  FinishedSequence f;
  gen_->RegisterCompletePages(slot);
  if (r.logits.empty()) {  // a prefill chunk before the last: its pass is done
    gen_->KeepPromptScores(slot, r);
    return;
  }
  if (gen_->Accept(slot, r, on_token, &f)) finished->push_back(std::move(f));
}

void PipelineGenerator::Poll(bool wait, const std::function<void(int, int32_t)>& on_token,
                             std::vector<FinishedSequence>* finished) {
  const size_t vocab = gen_->model()->config().vocab_size;
  for (int spins = 0;;) {
    bool any = false;
    for (int d = 1; d < stages_; ++d) {
      Inbox& box = inbox_[d];
      // Every message that has arrived from stage d.
      while (!box.stopped && box.request->Test()) {
        any = true;
        if (box.size == 0) {
          box.stopped = true;
          break;
        }
        std::vector<char> bytes(box.size);
        world_->Recv(bytes.data(), bytes.size(), Rank(d, 0), kDecisionTag);
        box.request = world_->IRecv(&box.size, sizeof(int64_t), Rank(d, 0), kDecisionTag);
        Reader r(bytes);
        const int k = r.Get<int32_t>();
        std::vector<std::pair<int, StepResult>> decided(k);
        for (auto& [seq, s] : decided) {
          seq = r.Get<int32_t>();
          s.exit_index = r.Get<int32_t>();
          s.depth = r.Get<int32_t>();
          s.temperature = r.Get<float>();
        }
        for (auto& [seq, s] : decided) {
          if (r.Get<int32_t>() != 0) {  // else a prefill chunk's pass, done
            const float* logits = r.Array<float>(vocab);
            s.logits.assign(logits, logits + vocab);
          }
          ReadPromptScores(r, &s);
          Take(seq, s, on_token, finished);
        }
        if (d == stages_ - 1) ++passes_done_;  // the last stage answers every pass
      }
    }
    if (any || !wait) return;
    Backoff(spins);
  }
}

std::vector<FinishedSequence> PipelineGenerator::Advance(
    const std::function<void(int, int32_t)>& on_token) {
  EE_CHECK(leader(), "Advance on a rank that does not lead the pipeline");
  Start();
  std::vector<FinishedSequence> finished;
  Poll(/*wait=*/false, on_token, &finished);
  // At most 2 passes per stage on their way: when stage 0 decides the tokens itself, it could
  // otherwise run ahead of the deeper stages without bound (they still run every token).
  if (passes_sent_ - passes_done_ >= 2 * stages_) {
    Poll(/*wait=*/true, on_token, &finished);
    return finished;
  }
  const size_t ch = gen_->model()->config().hidden_size;
  // A pass of sequences whose next tokens are known, within the row budget, and at most
  // 1 / stages of the running ones: the batch circulates as (at least) one group per stage, so
  // that every stage has work while the others run the other groups. Slots are taken round-robin
  // so that sequences decided at stage 0, ready again at once, do not starve the others.
  const int most = (active() + stages_ - 1) / stages_;
  std::vector<StageItem> items;
  std::vector<int32_t> ids;
  // Chunked prefill: the prompt rows this pass may take.
  int chunk = gen_->prefill_chunk() > 0 ? gen_->prefill_chunk() : std::numeric_limits<int>::max();
  const int first = next_slot_;
  for (int k = 0; k < gen_->max_sequences() && static_cast<int>(items.size()) < most; ++k) {
    const int s = (first + k) % gen_->max_sequences();
    if (!gen_->busy(s) || deciding_[s]) continue;
    const bool starts = gen_->starts(s);
    const bool scoring = starts && gen_->request(s).prompt_logprobs;
    const int take = starts ? chunk : std::numeric_limits<int>::max();
    const int rows = std::min(take, gen_->next_length(s));
    if (rows == 0) continue;  // this pass's prompt rows are taken
    if (static_cast<int>(ids.size()) + rows > gen_->row_budget()) continue;
    next_slot_ = s + 1;
    StageItem it;
    it.seq = s;
    it.start = gen_->length(s);  // when it starts: its cached prefix (prefix caching), or 0
    it.early_exit = gen_->early_exit(s);
    if (starts) it.kv_pages = gen_->kv_pages(s);  // (again with each chunk: the same)
    it.partial = take < gen_->next_length(s);
    const std::vector<int32_t> next = gen_->TakeNext(s, take);
    if (starts) chunk -= static_cast<int>(next.size());
    it.n = static_cast<int>(next.size());
    if (scoring) {  // the last stage scores the prompt's rows of this pass, by position
      it.score_ids = gen_->request(s).prompt;
      it.score_top = gen_->request(s).top_logprobs;
    }
    ids.insert(ids.end(), next.begin(), next.end());
    items.push_back(std::move(it));
  }
  if (items.empty()) {
    bool waiting = false;
    for (int f : in_flight_) waiting |= f != 0;
    if (waiting) Poll(/*wait=*/true, on_token, &finished);
    return finished;
  }
  if (tp_ > 1) {
    auto [w, body] = EncodePass<int32_t>(items, 1);
    std::copy(ids.begin(), ids.end(), body);
    const std::vector<char> plan = w.Take();
    for (int peer = 1; peer < tp_; ++peer) outbox_->Send(Rank(0, peer), kPlanTag, plan);
  }
  Timer timer;
  const std::vector<StepResult> r = gen_->StagePass(items, ids.data(), nullptr);
  gen_->model()->backend()->Synchronize();  // a GPU's kernels, queued, are part of the pass
  stats_.pass_seconds += timer.Seconds();
  ++stats_.passes;
  stats_.rows += ids.size();
  for (size_t k = 0; k < items.size(); ++k) items[k].live = r[k].logits.empty();
  if (stages_ > 1) {
    auto [w, body] = EncodePass<float>(items, ch);
    gen_->model()->backend()->CopyToHost(body, gen_->stage_output(),
                                         ids.size() * ch * sizeof(float));
    outbox_->Send(Rank(1, 0), kPassTag, w.Take());
    ++passes_sent_;
  }
  for (size_t k = 0; k < items.size(); ++k) {
    ++in_flight_[items[k].seq];
    stats_.most_in_flight_of_one = std::max(stats_.most_in_flight_of_one, in_flight_[items[k].seq]);
    if (!items[k].partial) deciding_[items[k].seq] = 1;
    if (!items[k].live || (items[k].partial && stages_ == 1)) {
      stats_.decided_here += !items[k].live;
      Take(items[k].seq, r[k], on_token, &finished);
    }
  }
  return finished;
}

void PipelineGenerator::Stop() {
  EE_CHECK(leader(), "Stop on a rank that does not lead the pipeline");
  Start();
  // Stop stage 0's peers and the next stage; each deeper stage answers with an empty message
  // once every pass before it is done. Decisions still on their way are dropped (their
  // sequences were retired).
  for (int peer = 1; peer < tp_; ++peer) outbox_->Send(Rank(0, peer), kPlanTag, {});
  if (stages_ > 1) outbox_->Send(Rank(1, 0), kPassTag, {});
  std::vector<FinishedSequence> unused;
  for (bool all = false; !all;) {
    all = true;
    for (int d = 1; d < stages_; ++d) all &= inbox_[d].stopped;
    if (!all) Poll(/*wait=*/true, nullptr, &unused);
  }
  outbox_->Flush();
  started_ = false;
}

std::vector<double> PipelineGenerator::PassSecondsOfEveryRank() {
  const float mine = static_cast<float>(stats_.pass_seconds);
  std::vector<float> all(world_->size());
  world_->AllGather(&mine, all.data(), 1);
  return std::vector<double>(all.begin(), all.end());
}

void PipelineGenerator::Work() {
  EE_CHECK(!leader(), "the pipeline's leader cannot Work()");
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  const bool decides = !first && tp_rank_ == 0;  // sends this stage's decisions to the leader
  const int upstream = first ? Rank(0, 0) : Rank(stage_ - 1, tp_rank_);
  const int downstream = last ? -1 : Rank(stage_ + 1, tp_rank_);
  const size_t ch = gen_->model()->config().hidden_size, vocab = gen_->model()->config().vocab_size;
  Outbox out(world_);
  for (;;) {
    const std::vector<char> bytes = Receive(world_, upstream, first ? kPlanTag : kPassTag);
    if (bytes.empty()) break;
    Reader reader(bytes);
    std::vector<StageItem> items = DecodeItems(reader);
    const int rows = Rows(items);
    Timer timer;
    const std::vector<StepResult> r =
        first ? gen_->StagePass(items, reader.Array<int32_t>(rows), nullptr)
              : gen_->StagePass(items, nullptr, reader.Array<float>(rows * ch));
    gen_->model()->backend()->Synchronize();
    stats_.pass_seconds += timer.Seconds();
    ++stats_.passes;
    stats_.rows += rows;
    // Decided here; on the last stage also the prefill chunks before their last (no head runs
    // for them), whose passes the leader waits for.
    std::vector<int> decided;
    for (size_t k = 0; k < items.size(); ++k) {
      if (!r[k].logits.empty() || (last && items[k].partial))
        decided.push_back(static_cast<int>(k));
      stats_.decided_here += !r[k].logits.empty();
    }
    if (decides && (!decided.empty() || last)) {  // the last stage answers every pass
      Writer w;
      w.Put<int32_t>(static_cast<int32_t>(decided.size()));
      for (int k : decided) {
        w.Put<int32_t>(items[k].seq);
        w.Put<int32_t>(r[k].exit_index);
        w.Put<int32_t>(r[k].depth);
        w.Put<float>(r[k].temperature);
      }
      for (int k : decided) {
        w.Put<int32_t>(!r[k].logits.empty());
        if (!r[k].logits.empty()) std::copy_n(r[k].logits.data(), vocab, w.Grow<float>(vocab));
        WritePromptScores(r[k], &w);
      }
      out.Send(Rank(0, 0), kDecisionTag, w.Take());
    }
    if (!last) {
      for (int k : decided) items[k].live = false;  // (never a chunk: no head runs for those)
      auto [w, body] = EncodePass<float>(items, ch);
      gen_->model()->backend()->CopyToHost(body, gen_->stage_output(), rows * ch * sizeof(float));
      out.Send(downstream, kPassTag, w.Take());
    }
  }
  if (!last) out.Send(downstream, kPassTag, {});
  if (decides) out.Send(Rank(0, 0), kDecisionTag, {});
  out.Flush();
}

}  // namespace eellm
