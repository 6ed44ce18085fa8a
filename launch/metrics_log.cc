#include "launch/metrics_log.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "models/exit_loss_weights.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

nlohmann::json Losses(const ModelConfig& c, double final_loss, bool final_computed,
                      const std::vector<double>& exit_losses) {
  nlohmann::json j = nlohmann::json::object();
  if (final_computed) j["final"] = final_loss;
  for (size_t i = 0; i < exit_losses.size(); ++i) {
    j[ExitName(c, static_cast<int>(i))] = exit_losses[i];
  }
  return j;
}

// TensorBoard scalars: `prefix`/<head> for each loss of `losses`, then `more`.
std::vector<std::pair<std::string, float>> Scalars(
    const std::string& prefix, const nlohmann::json& losses,
    std::vector<std::pair<std::string, float>> more = {}) {
  std::vector<std::pair<std::string, float>> s;
  for (auto it = losses.begin(); it != losses.end(); ++it) {
    s.push_back({prefix + "/" + it.key(), it.value().get<float>()});
  }
  s.insert(s.end(), more.begin(), more.end());
  return s;
}

}  // namespace

absl::StatusOr<MetricsLog> MetricsLog::Open(const std::string& path, int first_step) {
  std::error_code ec;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  std::string kept;  // the lines of earlier steps
  if (std::ifstream in(path); in) {
    for (std::string line; std::getline(in, line);) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      // A step's training line stays with the run that trained it; its validation the
      // resumed run repeats.
      const int step = j.is_object() ? j.value("step", first_step + 1) : first_step + 1;
      if (step < first_step || (step == first_step && j.contains("loss"))) kept += line + "\n";
    }
  }
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f != nullptr) std::fputs(kept.c_str(), f);
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open the metrics file ", path, ": ", std::strerror(errno)));
  }
  MetricsLog log;
  log.file_ = std::shared_ptr<std::FILE>(f, [](std::FILE* p) { std::fclose(p); });
  return log;
}

MetricsLog OpenRunMetrics(const std::string& path, const std::string& tensorboard_dir,
                          int first_step, bool verbose) {
  MetricsLog log;
  if (!path.empty()) {
    auto opened = MetricsLog::Open(path, first_step);
    if (opened.ok()) log = std::move(*opened);
    if (!opened.ok()) {
      std::fprintf(stderr, "warning: %s; no metrics are written there\n",
                   std::string(opened.status().message()).c_str());
    }
  }
  if (!tensorboard_dir.empty()) {
    auto events = TensorBoardEvents::Open(tensorboard_dir, first_step);
    if (!events.ok()) {
      std::fprintf(stderr, "warning: %s; no TensorBoard events are written\n",
                   std::string(events.status().message()).c_str());
    } else {
      if (verbose) std::printf("tensorboard: %s\n", events->path().c_str());
      log.set_tensorboard(*std::move(events));
    }
  }
  return log;
}

void MetricsLog::Train(int step, const ModelConfig& c, double final_loss, bool final_computed,
                       const std::vector<double>& exit_losses, double lr, double grad_norm,
                       double tokens_per_s) {
  const nlohmann::json losses = Losses(c, final_loss, final_computed, exit_losses);
  tensorboard_.Write(step, Scalars("loss", losses,
                                   {{"lr", static_cast<float>(lr)},
                                    {"grad_norm", static_cast<float>(grad_norm)},
                                    {"tokens_per_s", static_cast<float>(tokens_per_s)}}));
  if (!file_) return;
  const nlohmann::json j = {{"step", step},
                            {"loss", losses},
                            {"lr", lr},
                            {"grad_norm", grad_norm},
                            {"tokens_per_s", tokens_per_s}};
  std::fprintf(file_.get(), "%s\n", j.dump().c_str());
  std::fflush(file_.get());
}

void MetricsLog::Eval(int step, const ModelConfig& c, double final_loss, bool final_computed,
                      const std::vector<double>& exit_losses) {
  const nlohmann::json losses = Losses(c, final_loss, final_computed, exit_losses);
  tensorboard_.Write(step, Scalars("val_loss", losses));
  if (!file_) return;
  const nlohmann::json j = {{"step", step}, {"val_loss", losses}};
  std::fprintf(file_.get(), "%s\n", j.dump().c_str());
  std::fflush(file_.get());
}

}  // namespace eellm
