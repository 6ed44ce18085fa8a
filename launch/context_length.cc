#include "launch/context_length.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace eellm {

absl::StatusOr<int> ContextLength(const ModelConfig& c, int max_model_len, int64_t needed) {
  if (max_model_len < 0 || max_model_len > c.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("--max_model_len ", max_model_len,
                                                   " must be in [1, the model's max_seq_len ",
                                                   c.max_seq_len, "] (0: the model's)"));
  }
  if (max_model_len > 0) return max_model_len;
  if (needed > 0) return static_cast<int>(std::min<int64_t>(needed, c.max_seq_len));
  return c.max_seq_len;
}

absl::Status CheckGeneratorFits(int64_t bytes, int64_t kv_tokens, int64_t available,
                                absl::string_view sized_by) {
  if (available < 0 || static_cast<double>(bytes) <= 0.9 * static_cast<double>(available)) {
    return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "a KV cache of ", kv_tokens, " tokens (", sized_by, ") and the buffers of a context need ",
      ByteSize(bytes), " in this process, more than 90% of the ", ByteSize(available),
      " free: lower --max_model_len (the longest prompt + completion to serve) or --max_batch, "
      "or set --kv_cache_tokens"));
}

int64_t AvailablePerProcess(int64_t available, bool host_memory, int local_ranks) {
  if (available < 0 || !host_memory || local_ranks <= 1) return available;
  return available / local_ranks;
}

std::string ByteSize(int64_t bytes) {
  if (bytes >= 1000000000) return absl::StrFormat("%.1f GB", bytes / 1e9);
  if (bytes >= 1000000) return absl::StrFormat("%.1f MB", bytes / 1e6);
  return absl::StrFormat("%.1f kB", bytes / 1e3);
}

}  // namespace eellm
