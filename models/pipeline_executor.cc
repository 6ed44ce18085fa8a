#include "models/pipeline_executor.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <utility>

#include "engine/core/status.h"
#include "parallel/pipeline/send_posting.h"

namespace eellm {

namespace {

Schedule TrainingSchedule(const std::vector<Model*>& chunks, int stages, int microbatches,
                          bool place_exits) {
  const int v = static_cast<int>(chunks.size());
  Schedule s;
  if (v == 1) {
    s = OneFOneB(stages, microbatches);
  } else {
    auto built = Interleaved1F1B(stages, microbatches, v);
    EE_CHECK(built.ok(), built.status().message());
    s = *std::move(built);
  }
  if (place_exits) {
    const ModelConfig& c = chunks[0]->config();
    // Indexed by stage when v == 1 (the same thing), by virtual stage otherwise.
    std::vector<bool> has_exits(stages * v, false);
    for (size_t i = 0; i < c.exits.size(); ++i) {
      has_exits[Model::ExitStage(c, static_cast<int>(i), stages * v, chunks[0]->depth())] = true;
    }
    s = PlaceExitHeads(s, has_exits);
  }
  // Interleaved: messages in batched exchanges, which NCCL's rendezvous sends need with more
  // microbatches than stages (send_posting.h), on every communicator so that one order is
  // tested; the cost model times both orders the same without exits (exit work moves to right
  // before its backward: -3.5% to +2.3%, see BatchExchanges).
  return v == 1 ? s : BatchExchanges(s);
}

// The forwards of the training schedule alone (validation, EE-Tuning): the all-forward half of
// AFAB (in microbatch order), or with model chunks the forwards of the interleaved schedule in
// its order.
Schedule ForwardSchedule(const Schedule& training, int stages, int microbatches, int chunks) {
  Schedule fwd = chunks == 1 ? AllForwardAllBackward(stages, microbatches) : training;
  fwd.name += " forwards";
  for (auto& actions : fwd.per_stage) {
    actions.erase(std::remove_if(actions.begin(), actions.end(),
                                 [](const Action& a) {
                                   return a.type == ActionType::kRecvBackward ||
                                          a.type == ActionType::kBackward ||
                                          a.type == ActionType::kSendBackward ||
                                          a.type == ActionType::kExitHeads;
                                 }),
                  actions.end());
  }
  return fwd;
}

// EE-Tuning's schedule: the forwards, each followed by its exit work (ExitHeads) after the
// activations have been sent, so that a stage's exits do not delay the next stage (on every
// stage: the last one also takes the final head's loss there). Virtual stages after
// `last_virtual` (the last holding an exit) have nothing to do: their actions are dropped, and
// so are the sends to them.
Schedule TuneExitsSchedule(const Schedule& forwards, int last_virtual) {
  Schedule s = forwards;
  s.name += " + exits";
  const int stages = static_cast<int>(s.per_stage.size());
  for (int stage = 0; stage < stages; ++stage) {
    auto& actions = s.per_stage[stage];
    auto dropped = [&](const Action& a) {
      const int virt = a.chunk * stages + stage;
      return virt > last_virtual || (virt == last_virtual && a.type == ActionType::kSendForward);
    };
    actions.erase(std::remove_if(actions.begin(), actions.end(), dropped), actions.end());
    std::vector<Action> out;
    for (size_t i = 0; i < actions.size(); ++i) {
      out.push_back(actions[i]);
      const bool sends = i + 1 < actions.size() && actions[i + 1].type == ActionType::kSendForward;
      if (actions[i].type == ActionType::kSendForward ||
          (actions[i].type == ActionType::kForward && !sends)) {
        out.push_back({ActionType::kExitHeads, actions[i].microbatch, actions[i].chunk});
      }
    }
    actions = std::move(out);
  }
  return s;
}

// For each action of `actions`, whether it is the last one of its (microbatch, chunk) record.
std::vector<bool> LastOfRecord(const std::vector<Action>& actions) {
  std::vector<bool> last(actions.size(), false);
  std::set<std::pair<int, int>> seen;
  for (size_t i = actions.size(); i-- > 0;) {
    last[i] = seen.insert({actions[i].microbatch, actions[i].chunk}).second;
  }
  return last;
}

// Peak number of records of each chunk held at once when a record lives from its first action
// to its last.
std::vector<int> PeakPerChunk(const std::vector<Action>& actions, int chunks) {
  std::vector<int> held(chunks, 0), peak(chunks, 0);
  const std::vector<bool> last = LastOfRecord(actions);
  std::set<std::pair<int, int>> open;
  for (size_t i = 0; i < actions.size(); ++i) {
    const Action& a = actions[i];
    if (open.insert({a.microbatch, a.chunk}).second) {
      peak[a.chunk] = std::max(peak[a.chunk], ++held[a.chunk]);
    }
    if (last[i]) --held[a.chunk];
  }
  return peak;
}

}  // namespace

PipelineExecutor::PipelineExecutor(Model* model, ParallelContext* ctx, int micro_batch, int seq,
                                   int microbatches, bool place_exits)
    : PipelineExecutor(std::vector<Model*>{model}, ctx, micro_batch, seq, microbatches,
                       place_exits) {}

PipelineExecutor::PipelineExecutor(std::vector<Model*> chunks, ParallelContext* ctx,
                                   int micro_batch, int seq, int microbatches, bool place_exits)
    : chunks_(std::move(chunks)),
      ctx_(ctx),
      micro_batch_(micro_batch),
      seq_(seq),
      microbatches_(microbatches),
      schedule_(TrainingSchedule(chunks_, ctx->grid.pp(), microbatches, place_exits)),
      schedule_rendezvous_(CheckRendezvous(schedule_)),
      forward_schedule_(ForwardSchedule(schedule_, ctx->grid.pp(), microbatches,
                                        static_cast<int>(chunks_.size()))),
      forward_rendezvous_(CheckRendezvous(forward_schedule_)),
      loss_log_(chunks_[0]->backend()) {
  const int v = static_cast<int>(chunks_.size());
  const std::vector<int> peak = PeakPerChunk(schedule_.per_stage[ctx->coord.pp], v);
  // Stage messages carry the residual stream's rows this rank holds (all, or its block of them
  // under sequence parallelism).
  const size_t nc = static_cast<size_t>(chunks_[0]->ResidualRows(micro_batch * seq)) *
                    chunks_[0]->config().hidden_size;
  slots_.resize(v);
  for (int c = 0; c < v; ++c) {
    for (int i = 0; i < std::max(1, peak[c]); ++i) {
      Slot slot;
      slot.ws = chunks_[c]->MakeWorkspace(micro_batch, seq);
      slot.grad_in = Buffer(chunks_[c]->backend(), nc * sizeof(float));
      slots_[c].push_back(std::move(slot));
    }
  }
}

void PipelineExecutor::set_frozen_backbone(bool frozen, bool stop_at_deepest_exit) {
  frozen_backbone_ = frozen;
  const ModelConfig& c = chunks_[0]->config();
  const int virtual_stages = ctx_->grid.pp() * static_cast<int>(chunks_.size());
  tune_depth_ = stop_at_deepest_exit ? Model::DeepestExitDepth(c) : c.num_layers;
  const int last_virtual = stop_at_deepest_exit
                               ? Model::LastStageWithExit(c, virtual_stages, chunks_[0]->depth())
                               : virtual_stages - 1;
  if (frozen) {
    tune_schedule_ = TuneExitsSchedule(forward_schedule_, last_virtual);
    tune_rendezvous_ = CheckRendezvous(tune_schedule_);
    cached_schedule_ = tune_schedule_;
    cached_schedule_.name += " from the tune cache";
    for (auto& actions : cached_schedule_.per_stage) {
      actions.erase(
          std::remove_if(actions.begin(), actions.end(),
                         [](const Action& a) { return a.type != ActionType::kExitHeads; }),
          actions.end());
    }
  }
}

std::vector<size_t> PipelineExecutor::TuneFloatsPerWindow() {
  EE_CHECK(frozen_backbone_, "the tune cache needs a frozen backbone");
  std::vector<size_t> floats;
  for (size_t ch = 0; ch < chunks_.size(); ++ch) {
    chunks_[ch]->set_forward_end(tune_depth_);
    floats.push_back(chunks_[ch]->TuneInputs(*slots_[ch][0].ws).size() * seq_ *
                     chunks_[ch]->config().hidden_size);
    chunks_[ch]->set_forward_end(-1);
  }
  return floats;
}

size_t PipelineExecutor::TuneCacheBytesPerWindow() {
  size_t floats = 0;
  for (size_t f : TuneFloatsPerWindow()) floats += f;
  return floats * sizeof(float);
}

void PipelineExecutor::set_tune_cache(int64_t windows) {
  tune_cache_.reset();
  if (windows > 0) tune_cache_ = std::make_unique<TuneInputCache>(windows, TuneFloatsPerWindow());
}

void PipelineExecutor::CopyTuneInputs(Workspace& ws, int m, int ch, bool store) {
  Model* model = chunks_[ch];
  const std::vector<float*> in = model->TuneInputs(ws);
  const size_t per = static_cast<size_t>(seq_) * model->config().hidden_size;  // one row's
  for (int j = 0; j < micro_batch_ && !in.empty(); ++j) {
    const size_t row = static_cast<size_t>(m) * micro_batch_ + j;
    if (store && !admitted_[row]) continue;
    float* rows = tune_cache_->Rows(ch, step_windows_[row]);
    for (size_t k = 0; k < in.size(); ++k) {
      float* dev = in[k] + j * per;
      if (store) {
        model->backend()->CopyToHost(rows + k * per, dev, per * sizeof(float));
      } else {
        model->backend()->CopyFromHost(dev, rows + k * per, per * sizeof(float));
      }
    }
  }
}

void PipelineExecutor::WaitSlot(Slot& slot) {
  for (auto& r : slot.pending) {
    // Waiting on a send the communicator still holds would post it alone, outside the groups
    // whose deadlock freedom send_posting.h checks.
    EE_CHECK(r->posted(), "pipeline stage ", ctx_->coord.pp,
             " would wait on a held send before its group is posted");
    r->Wait();
  }
  slot.pending.clear();
}

LossReport PipelineExecutor::Run(const Schedule& s, const absl::Status& rendezvous,
                                 const int32_t* ids, const int32_t* targets,
                                 absl::Span<const float> exit_weights, Mode mode) {
  const ModelConfig& c = chunks_[0]->config();
  Backend* be = chunks_[0]->backend();
  const int stage = ctx_->coord.pp, stages = ctx_->grid.pp();
  const int v = static_cast<int>(chunks_.size());
  const int last_virtual = stages * v - 1;
  const int rows = micro_batch_ * seq_;
  const size_t bytes =
      static_cast<size_t>(chunks_[0]->ResidualRows(rows)) * c.hidden_size * sizeof(float);
  const float loss_scale = 1.0f / microbatches_;
  // The heads' losses stay on the device until the step ends: one read-back a step, not one a
  // head and micro-batch (an exit's confidences too, where they weight its loss).
  const size_t per_exit = c.confidence_weighted_exit_loss ? 2 : 1;
  loss_log_.Reserve(static_cast<size_t>(microbatches_) * (c.exits.size() * per_exit + 1) * rows);
  for (Model* m : chunks_) m->set_loss_log(&loss_log_);
  if (eod_id_ >= 0) {
    // Every stage holds the ids, so each makes the mask of its heads itself.
    loss_mask_.resize(static_cast<size_t>(microbatches_) * rows);
    for (size_t i = 0; i < loss_mask_.size(); ++i) loss_mask_[i] = ids[i] == eod_id_ ? 0.0f : 1.0f;
  }
  const int next = (stage + 1) % stages, prev = (stage + stages - 1) % stages;
  // Tags name the sender's (microbatch, chunk) and the direction.
  auto fwd_tag = [&](int m, int sender_chunk) { return m * v + sender_chunk; };
  auto bwd_tag = [&](int m, int sender_chunk) { return microbatches_ * v + m * v + sender_chunk; };
  const int max_in_flight = MaxInFlight(s, stage);
  Communicator* pp = ctx_->pp.get();
  std::map<int, Buffer> local;  // stages == 1: tensors "sent" to this rank, by tag
  const std::vector<Action>& actions = s.per_stage[stage];
  // A communicator that holds messages back (NCCL) posts them in the groups PostAfter gives,
  // under which the schedule cannot deadlock its rendezvous sends (checked;
  // parallel/pipeline/send_posting.h). Receives are waited for when their run of messages has
  // been posted, before the next compute.
  EE_CHECK(rendezvous.ok() || pp->name() != "nccl",
           "a pipeline group on NCCL with a schedule that deadlocks it: ", rendezvous.message());
  std::vector<std::unique_ptr<Request>> receiving;  // receives of the current run of messages
  std::vector<Slot*> wait_after_run;  // slots taken by a receive: their old sends, see below
  auto send = [&](Slot& slot, const float* data, int dst, int tag) {
    if (dst == stage) {
      Buffer b(be, bytes);
      be->Copy(b.data(), data, bytes);
      local[tag] = std::move(b);
    } else {
      slot.pending.push_back(pp->ISend(data, bytes, dst, tag));
    }
  };
  auto recv = [&](Slot& slot, int src, int tag) {
    if (src == stage) {
      auto it = local.find(tag);
      EE_CHECK(it != local.end(), "local pipeline message ", tag, " was never sent");
      be->Copy(slot.grad_in.data(), it->second.data(), bytes);
      local.erase(it);
    } else {
      receiving.push_back(pp->IRecv(slot.grad_in.data(), bytes, src, tag));
    }
  };
  LossReport total;
  total.exit_losses.assign(c.exits.size(), 0.0);
  auto accumulate = [&](const LossReport& r) {
    loss_log_.EndReport();  // (r's losses and objective: 0 until the log adds them at the end)
    total.final_loss += r.final_loss / microbatches_;
    for (size_t i = 0; i < c.exits.size(); ++i)
      total.exit_losses[i] += r.exit_losses[i] / microbatches_;
    total.objective += r.objective;
    total.tokens += r.tokens;
  };
  const std::vector<bool> last_of_record = LastOfRecord(actions);
  // Each chunk's last backward action: its layers' gradients are final as they finish.
  std::vector<size_t> last_backward(chunks_.size(), actions.size());
  for (size_t ai = 0; ai < actions.size(); ++ai) {
    if (actions[ai].type == ActionType::kBackward) last_backward[actions[ai].chunk] = ai;
  }
  std::map<std::pair<int, int>, int> slot_of;  // (microbatch, chunk) -> slot in the chunk's pool
  std::vector<int> next_slot(v, 0);            // round robin over free slots
  int held = 0;
  intervals_.clear();
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [&t0]() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  for (size_t ai = 0; ai < actions.size(); ++ai) {
    const Action& a = actions[ai];
    const int m = a.microbatch, ch = a.chunk;
    const int virt = ch * stages + stage;
    Model* model = chunks_[ch];
    std::vector<Slot>& pool = slots_[ch];
    auto found = slot_of.find({m, ch});
    bool wait_after_receive = false;
    if (found == slot_of.end()) {
      // The record's first action: take a free workspace; the sends that last read from it
      // must finish before it is overwritten. When the record starts with a receive (into
      // grad_in, which no send reads), they are waited for after its run of messages has been
      // posted, so that held messages go out in the groups send_posting.h's check assumes.
      const int n = static_cast<int>(pool.size());
      int pick = -1;
      for (int k = 0; k < n && pick < 0; ++k) {
        const int i = (next_slot[ch] + k) % n;
        if (!pool[i].busy) pick = i;
      }
      EE_CHECK(pick >= 0, "no free workspace for microbatch ", m, " chunk ", ch);
      next_slot[ch] = (pick + 1) % n;
      pool[pick].busy = true;
      wait_after_receive = IsRecv(a.type);
      if (!wait_after_receive) WaitSlot(pool[pick]);
      found = slot_of.emplace(std::make_pair(m, ch), pick).first;
      ++held;
      peak_in_flight_ = std::max(peak_in_flight_, held);
      EE_CHECK(held <= std::max(1, max_in_flight), "stage ", stage, " holds ", held,
               " microbatch records, more than the schedule's ", max_in_flight);
    }
    Slot& slot = pool[found->second];
    Workspace& ws = *slot.ws;
    // Hidden dropout's row numbers: the microbatch's first sample's, in training passes only.
    ws.dropout_row0 =
        mode == Mode::kEvaluate ? -1 : (first_sample_ + int64_t{m} * micro_batch_) * seq_;
    const double start = since();
    const int32_t* mb_ids = ids + static_cast<size_t>(m) * rows;
    const int32_t* mb_targets = targets + static_cast<size_t>(m) * rows;
    const float* mb_mask =
        eod_id_ >= 0 ? loss_mask_.data() + static_cast<size_t>(m) * rows : nullptr;
    switch (a.type) {
      case ActionType::kRecvForward:
        recv(slot, prev, fwd_tag(m, stage == 0 ? ch - 1 : ch));
        break;
      case ActionType::kForward:
        model->StageForward(ws, mb_ids, slot.grad_in.f32());
        if (mode == Mode::kTuneExits && tune_cache_) CopyTuneInputs(ws, m, ch, /*store=*/true);
        if (mode == Mode::kEvaluate) {
          // Validation: the heads of this chunk right away (no backward pass follows).
          accumulate(model->StageBackward(ws, mb_targets, mb_mask, exit_weights, false, nullptr,
                                          loss_scale));
        }
        break;
      case ActionType::kSendForward:
        send(slot, model->StageOutput(ws), next, fwd_tag(m, ch));
        break;
      case ActionType::kRecvBackward:
        recv(slot, next, bwd_tag(m, stage == stages - 1 ? ch + 1 : ch));
        break;
      case ActionType::kBackward:
        if (grads_ready_ && ai == last_backward[ch]) {
          model->set_layer_grads_done(
              [this, ch](size_t lo, size_t hi) { grads_ready_(ch, lo, hi); });
        }
        accumulate(model->StageBackward(ws, mb_targets, mb_mask, exit_weights, true,
                                        virt == last_virtual ? nullptr : slot.grad_in.f32(),
                                        loss_scale));
        model->set_layer_grads_done(nullptr);
        break;
      case ActionType::kSendBackward:
        send(slot, model->StageInputGrad(ws), prev, bwd_tag(m, ch));
        break;
      case ActionType::kExitHeads:
        if (mode == Mode::kTuneCached) CopyTuneInputs(ws, m, ch, /*store=*/false);
        accumulate(mode == Mode::kTuneExits || mode == Mode::kTuneCached
                       ? model->StageTuneExits(ws, mb_targets, mb_mask, exit_weights, loss_scale)
                       : model->StageExitHeads(ws, mb_targets, mb_mask, exit_weights, loss_scale));
        break;
    }
    if (wait_after_receive) wait_after_run.push_back(&slot);
    if (PostAfter(actions, ai, stages)) pp->PostHeld();
    if (ai + 1 == actions.size() || !IsMessage(actions[ai + 1].type)) {
      for (auto& r : receiving) r->Wait();
      receiving.clear();
      for (Slot* waited : wait_after_run) WaitSlot(*waited);
      wait_after_run.clear();
    }
    if (IsCompute(a.type)) {
      intervals_.push_back(BusyInterval{start, since(), a});
    }
    if (last_of_record[ai]) {
      slot.busy = false;
      slot_of.erase(found);
      --held;
    }
  }
  for (auto& pool : slots_) {
    for (Slot& slot : pool) WaitSlot(slot);
  }
  EE_CHECK(local.empty(), local.size(), " local pipeline messages were never received");
  for (Model* m : chunks_) m->set_loss_log(nullptr);
  loss_log_.TakeInto(&total, microbatches_);
  return total;
}

LossReport PipelineExecutor::TrainStep(const int32_t* ids, const int32_t* targets,
                                       absl::Span<const float> exit_weights) {
  ctx_->pp->Barrier();  // a common time origin for the recorded intervals
  if (frozen_backbone_) {
    // No layer runs past the deepest exit (its stage computes no final head then).
    for (Model* m : chunks_) m->set_forward_end(tune_depth_);
    bool cached = false;
    if (tune_cache_) {
      const size_t rows = static_cast<size_t>(microbatches_) * micro_batch_;
      EE_CHECK(step_windows_.size() == rows, "the tune cache needs the step's ", rows,
               " windows, got ", step_windows_.size());
      cached = std::all_of(step_windows_.begin(), step_windows_.end(),
                           [this](int64_t w) { return tune_cache_->Holds(w); });
      admitted_.assign(rows, false);
      for (size_t r = 0; r < rows && !cached; ++r)
        admitted_[r] = tune_cache_->Admit(step_windows_[r]);
    }
    LossReport r =
        cached
            ? Run(cached_schedule_, absl::OkStatus(), ids, targets, exit_weights, Mode::kTuneCached)
            : Run(tune_schedule_, tune_rendezvous_, ids, targets, exit_weights, Mode::kTuneExits);
    cached_steps_ += cached;
    last_step_cached_ = cached;
    for (Model* m : chunks_) m->set_forward_end(-1);
    return r;
  }
  return Run(schedule_, schedule_rendezvous_, ids, targets, exit_weights, Mode::kTrain);
}

LossReport PipelineExecutor::Evaluate(const int32_t* ids, const int32_t* targets) {
  std::vector<float> zero(chunks_[0]->config().exits.size(), 0.0f);
  return Run(forward_schedule_, forward_rendezvous_, ids, targets, zero, Mode::kEvaluate);
}

}  // namespace eellm
