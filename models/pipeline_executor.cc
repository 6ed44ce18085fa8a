#include "models/pipeline_executor.h"

#include <algorithm>
#include <chrono>

#include "engine/core/status.h"

namespace eellm {

namespace {

Schedule TrainingSchedule(const Model& model, int stages, int microbatches, bool place_exits) {
  Schedule s = OneFOneB(stages, microbatches);
  if (!place_exits) return s;
  const ModelConfig& c = model.config();
  const int per_stage = c.num_layers / stages;
  std::vector<bool> has_exits(stages, false);
  for (const ExitConfig& x : c.exits) has_exits[(x.layer - 1) / per_stage] = true;
  return PlaceExitHeads(s, has_exits);
}

}  // namespace

PipelineExecutor::PipelineExecutor(Model* model, ParallelContext* ctx, int micro_batch, int seq,
                                   int microbatches, bool place_exits)
    : model_(model),
      ctx_(ctx),
      micro_batch_(micro_batch),
      seq_(seq),
      microbatches_(microbatches),
      schedule_(TrainingSchedule(*model, ctx->grid.pp(), microbatches, place_exits)) {
  const int in_flight = std::max(1, MaxInFlight(schedule_, ctx->coord.pp));
  const size_t nc = static_cast<size_t>(micro_batch) * seq * model->config().hidden_size;
  for (int i = 0; i < in_flight; ++i) {
    slots_.push_back(model->MakeWorkspace(micro_batch, seq));
    grad_in_.emplace_back(model->backend(), nc * sizeof(float));
  }
  pending_.resize(in_flight);
}

void PipelineExecutor::WaitSlot(int slot) {
  for (auto& r : pending_[slot]) r->Wait();
  pending_[slot].clear();
}

LossReport PipelineExecutor::Run(const Schedule& s, const int32_t* ids, const int32_t* targets,
                                 absl::Span<const float> exit_weights, bool backward) {
  const ModelConfig& c = model_->config();
  const int stage = ctx_->coord.pp, stages = ctx_->grid.pp();
  const int rows = micro_batch_ * seq_;
  const size_t bytes = static_cast<size_t>(rows) * c.hidden_size * sizeof(float);
  const float loss_scale = 1.0f / microbatches_;
  const int n_slots = static_cast<int>(slots_.size());
  Communicator* pp = ctx_->pp.get();
  LossReport total;
  total.exit_losses.assign(c.exits.size(), 0.0);
  auto accumulate = [&](const LossReport& r) {
    total.final_loss += r.final_loss / microbatches_;
    for (size_t i = 0; i < c.exits.size(); ++i)
      total.exit_losses[i] += r.exit_losses[i] / microbatches_;
    total.objective += r.objective;
    total.tokens += r.tokens;
  };
  intervals_.clear();
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [&t0]() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  for (const Action& a : s.per_stage[stage]) {
    const int m = a.microbatch, slot = m % n_slots;
    const double start = since();
    Workspace& ws = *slots_[slot];
    const int32_t* mb_ids = ids + static_cast<size_t>(m) * rows;
    const int32_t* mb_targets = targets + static_cast<size_t>(m) * rows;
    switch (a.type) {
      case ActionType::kRecvForward:
        WaitSlot(slot);  // the slot's previous sends must finish before it is overwritten
        pp->Recv(grad_in_[slot].data(), bytes, stage - 1, m);
        break;
      case ActionType::kForward:
        if (stage == 0) WaitSlot(slot);
        model_->StageForward(ws, mb_ids, grad_in_[slot].f32());
        if (!backward) {
          // Validation: the heads of this stage right away (no backward pass follows).
          accumulate(model_->StageBackward(ws, mb_targets, nullptr, exit_weights, false, nullptr,
                                           loss_scale));
        }
        break;
      case ActionType::kSendForward:
        pending_[slot].push_back(pp->ISend(model_->StageOutput(ws), bytes, stage + 1, m));
        break;
      case ActionType::kRecvBackward:
        pp->Recv(grad_in_[slot].data(), bytes, stage + 1, m);
        break;
      case ActionType::kBackward:
        accumulate(model_->StageBackward(ws, mb_targets, nullptr, exit_weights, true,
                                         stage == stages - 1 ? nullptr : grad_in_[slot].f32(),
                                         loss_scale));
        break;
      case ActionType::kSendBackward:
        pending_[slot].push_back(pp->ISend(model_->StageInputGrad(ws), bytes, stage - 1, m));
        break;
      case ActionType::kExitHeads:
        accumulate(model_->StageExitHeads(ws, mb_targets, nullptr, exit_weights, loss_scale));
        break;
    }
    if (a.type == ActionType::kForward || a.type == ActionType::kBackward ||
        a.type == ActionType::kExitHeads) {
      intervals_.push_back(BusyInterval{start, since(), a});
    }
  }
  for (int i = 0; i < n_slots; ++i) WaitSlot(i);
  return total;
}

LossReport PipelineExecutor::TrainStep(const int32_t* ids, const int32_t* targets,
                                       absl::Span<const float> exit_weights) {
  ctx_->pp->Barrier();  // a common time origin for the recorded intervals
  return Run(schedule_, ids, targets, exit_weights, true);
}

LossReport PipelineExecutor::Evaluate(const int32_t* ids, const int32_t* targets) {
  // Forwards only, in microbatch order: the all-forward half of AFAB.
  Schedule fwd = AllForwardAllBackward(ctx_->grid.pp(), microbatches_);
  for (auto& actions : fwd.per_stage) {
    actions.erase(std::remove_if(actions.begin(), actions.end(),
                                 [](const Action& a) {
                                   return a.type == ActionType::kRecvBackward ||
                                          a.type == ActionType::kBackward ||
                                          a.type == ActionType::kSendBackward;
                                 }),
                  actions.end());
  }
  std::vector<float> zero(model_->config().exits.size(), 0.0f);
  return Run(fwd, ids, targets, zero, false);
}

}  // namespace eellm
