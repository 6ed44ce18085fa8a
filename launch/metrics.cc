#include "launch/metrics.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "models/exit_loss_weights.h"

namespace eellm {
namespace {

class Exposition {
 public:
  // A metric without labels, or one sample of a labelled one (`labels`: `head="exit@2"`).
  void Metric(const char* name, const char* type, const char* help, double value,
              const std::string& labels = "") {
    Header(name, type, help);
    absl::StrAppend(&text_, "eellm_", name, labels.empty() ? "" : "{", labels,
                    labels.empty() ? "" : "}", " ", Number(value), "\n");
  }
  void Histogram(const char* name, const char* help, const GenerationService::Histogram& h) {
    Header(name, "histogram", help);
    int64_t below = 0;
    for (size_t b = 0; b <= h.kBounds.size(); ++b) {
      below += h.counts[b];
      const std::string le = b < h.kBounds.size() ? absl::StrCat(h.kBounds[b]) : "+Inf";
      absl::StrAppend(&text_, "eellm_", name, "_bucket{le=\"", le, "\"} ", below, "\n");
    }
    absl::StrAppend(&text_, "eellm_", name, "_sum ", Number(h.sum), "\n");
    absl::StrAppend(&text_, "eellm_", name, "_count ", h.count, "\n");
  }
  std::string Take() { return std::move(text_); }

 private:
  void Header(const char* name, const char* type, const char* help) {
    if (name == last_) return;  // another sample of the same metric
    last_ = name;
    absl::StrAppend(&text_, "# HELP eellm_", name, " ", help, "\n# TYPE eellm_", name, " ", type,
                    "\n");
  }
  // Counts in full; other values to 12 significant digits.
  static std::string Number(double v) {
    if (v == std::trunc(v) && std::fabs(v) < 9e15) return absl::StrCat(static_cast<int64_t>(v));
    return absl::StrFormat("%.12g", v);
  }
  std::string text_, last_;
};

}  // namespace

std::string PrometheusMetrics(const GenerationService::Stats& st, const ModelConfig& c,
                              int kv_tokens, int max_batch) {
  Exposition e;
  e.Metric("requests_total", "counter", "Requests completed.", st.requests);
  e.Metric("sequences_finished_total", "counter", "Sequences generated to their end.",
           st.sequences);
  e.Metric("sequences_cancelled_total", "counter", "Sequences cancelled, running or queued.",
           st.cancelled);
  e.Metric("prompt_tokens_total", "counter", "Prompt tokens of the sequences admitted.",
           st.prompt_tokens);
  e.Metric("generation_tokens_total", "counter", "Tokens generated.", st.tokens);
  // Every head, so that an exit that never fires shows 0.
  for (int i = -1; i < static_cast<int>(c.exits.size()); ++i) {
    const auto it = st.tokens_by_head.find(i);
    e.Metric("generation_tokens_by_head_total", "counter",
             "Tokens of ended sequences, by the head that decided them.",
             it == st.tokens_by_head.end() ? 0 : it->second,
             absl::StrCat("head=\"", ExitName(c, i), "\""));
  }
  e.Metric("speculative_drafted_tokens_total", "counter",
           "Self-speculative decoding: drafts the full model checked.", st.drafted);
  e.Metric("speculative_accepted_tokens_total", "counter",
           "Self-speculative decoding: drafts the full model kept.", st.accepted);
  e.Metric("forward_passes_total", "counter", "Forward passes the generator ran.", st.steps);
  e.Metric("largest_batch", "gauge", "Most sequences one pass carried.", st.largest_batch);
  e.Metric("preemptions_total", "counter",
           "Sequences preempted for KV cache pages (they resume by recomputing their K/V).",
           st.preemptions);
  e.Metric("prefix_cache_hit_tokens_total", "counter",
           "Tokens whose K/V prefills took from the prefix cache instead of computing them.",
           st.prefix_cached_tokens);
  e.Metric("sequences_running", "gauge", "Sequences admitted and not ended.", st.running);
  e.Metric("sequences_waiting", "gauge", "Sequences queued for a slot or KV room.", st.waiting);
  e.Metric("max_batch", "gauge", "Sequence slots.", max_batch);
  e.Metric("kv_cache_tokens", "gauge", "Tokens the KV cache holds.", kv_tokens);
  e.Metric("kv_cache_tokens_in_use", "gauge", "KV cache tokens running sequences hold.",
           st.kv_tokens_in_use);
  e.Histogram("request_latency_seconds", "Time from a request's arrival to its answer.",
              st.request_seconds);
  e.Histogram("time_to_first_token_seconds",
              "Time from a request's arrival to each of its sequences' first token.",
              st.first_token_seconds);
  e.Histogram("inter_token_latency_seconds",
              "Time between consecutive tokens of a sequence (a speculative round's kept drafts "
              "come together).",
              st.inter_token_seconds);
  return e.Take();
}

}  // namespace eellm
