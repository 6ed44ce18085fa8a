#include "launch/progress.h"

#include "absl/strings/str_format.h"

namespace eellm {

std::string FormatDuration(double seconds) {
  long s = static_cast<long>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%ldh%02ldm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%ldm%02lds", s / 60, s % 60);
  return absl::StrFormat("%lds", s);
}

std::string Progress::Line(int done) const {
  const int width = 20;
  const double frac = total_ > 0 ? static_cast<double>(done) / total_ : 1.0;
  const int filled = static_cast<int>(frac * width + 0.5);
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  const double elapsed = timer_.Seconds();
  const double eta = done > 0 ? elapsed / done * (total_ - done) : 0;
  return absl::StrFormat("[%s] %3d%% ETA %s", bar, static_cast<int>(frac * 100 + 0.5),
                         FormatDuration(eta));
}

}  // namespace eellm
