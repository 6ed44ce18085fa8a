// The serving counters in Prometheus's text format (GET /metrics of `eellm serve`), as vLLM
// exposes its own: requests, sequences, tokens (generated tokens per head: how often each exit
// decides), speculative drafts, forward passes, running and waiting sequences, the KV cache, and
// histograms of request and first-token latency.
#pragma once

#include <string>

#include "launch/generation_service.h"
#include "models/model_config.h"

namespace eellm {

// `kv_tokens`, `max_batch`: the generator's KV cache size and slots.
std::string PrometheusMetrics(const GenerationService::Stats& stats, const ModelConfig& config,
                              int kv_tokens, int max_batch);

}  // namespace eellm
