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

void MetricsLog::Train(int step, const ModelConfig& c, double final_loss, bool final_computed,
                       const std::vector<double>& exit_losses, double lr, double grad_norm,
                       double tokens_per_s) {
  if (!file_) return;
  const nlohmann::json j = {{"step", step},
                            {"loss", Losses(c, final_loss, final_computed, exit_losses)},
                            {"lr", lr},
                            {"grad_norm", grad_norm},
                            {"tokens_per_s", tokens_per_s}};
  std::fprintf(file_.get(), "%s\n", j.dump().c_str());
  std::fflush(file_.get());
}

void MetricsLog::Eval(int step, const ModelConfig& c, double final_loss, bool final_computed,
                      const std::vector<double>& exit_losses) {
  if (!file_) return;
  const nlohmann::json j = {{"step", step},
                            {"val_loss", Losses(c, final_loss, final_computed, exit_losses)}};
  std::fprintf(file_.get(), "%s\n", j.dump().c_str());
  std::fflush(file_.get());
}

}  // namespace eellm
