// LossReport (what a training or evaluation pass reports) and LossLog: the heads' per-row losses
// of a step kept on the device as the heads compute them and read back once, at the step's end
// (the pipeline executor's passes), instead of once per head and micro-batch, each read-back a
// wait that empties a GPU's queue. Each head pass's mean loss and objective term are then the
// sums Model::HeadLoss forms from the same floats in the same order, so the reports are equal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/tensor/tensor.h"

namespace eellm {

struct LossReport {
  double final_loss = 0;            // mean cross-entropy of the final head
  std::vector<double> exit_losses;  // mean cross-entropy per exit (config order)
  double objective = 0;             // final + sum_i w_i * exit term_i (what is minimised)
  int64_t tokens = 0;               // tokens with non-zero mask
};

// A head pass's mean loss (sum of mask * loss over `count`) and objective term (sum of weight *
// loss; 0 without weights: a head that is reported, not trained) from its per-row losses on the
// host; with `confidences` (confidence-weighted exit losses: each row's max probability, a
// constant of the gradient) a row's weight is weights[r] * confidences[r] (fp32), as
// Backend::CrossEntropy's by_confidence weights its gradient (there times 1 / temperature too).
struct HeadLossSums {
  double mean = 0, term = 0;
};
HeadLossSums SumHeadLoss(const float* losses, const float* mask, double count, const float* weights,
                         const float* confidences, int n);

class LossLog {
 public:
  explicit LossLog(Backend* be) : be_(be) {}

  // Room for `rows` queued rows (the executor's: every head of every micro-batch of a pass), so
  // that Add allocates nothing inside a step.
  void Reserve(size_t rows);
  // Queues rows [0, n) of `losses` (device) from head `exit_index` (-1: the final head) with the
  // host's per-row mask, its sum `count` and the objective's per-row weights (copied; null: no
  // term), and the rows' confidences (device, copied and read back with the losses; null: none;
  // see SumHeadLoss).
  void Add(int exit_index, const float* losses, int n, const float* mask, double count,
           const float* weights, const float* confidences);
  // Closes the passes queued since the last call as one report's (a Model::Stage* call's): their
  // objective terms are summed first and then added to the total, as LossReports are.
  void EndReport();
  // Reads every queued loss back in one copy and adds, in the order queued, each pass's mean
  // loss / microbatches to total's final_loss or exit_losses[i], and each report's objective to
  // total's objective: the sums the executor forms from the reports themselves. Then empties.
  void TakeInto(LossReport* total, int microbatches);
  bool empty() const { return passes_.empty(); }

 private:
  struct Pass {
    int exit_index;
    size_t offset;  // in the device log
    int n;
    bool confidences;  // n more floats after the losses
    double count;
    std::vector<float> mask, weights;
    bool ends_report = false;
  };
  Backend* be_;
  Buffer log_;  // Reserve's size (grown by Add only past it)
  size_t used_ = 0;
  std::vector<Pass> passes_;
  std::vector<float> host_;
};

}  // namespace eellm
