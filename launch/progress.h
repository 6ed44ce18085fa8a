// Text progress bar with percentage and ETA for long-running loops.
#pragma once

#include <string>

#include "engine/core/timer.h"

namespace eellm {

class Progress {
 public:
  explicit Progress(int total) : total_(total) {}
  // "[#######.............]  35% ETA 1m12s" after `done` of `total` units.
  std::string Line(int done) const;

 private:
  int total_;
  Timer timer_;
};

// "1h02m", "3m05s", "12s".
std::string FormatDuration(double seconds);

}  // namespace eellm
