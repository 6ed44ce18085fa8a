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

absl::Status CheckKvCacheFits(int64_t tokens, int64_t bytes_per_token, int64_t available,
                              absl::string_view sized_by) {
  const double need = static_cast<double>(tokens) * static_cast<double>(bytes_per_token);
  if (available < 0 || need <= 0.9 * static_cast<double>(available)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "a KV cache of ", tokens, " tokens (", sized_by, ") needs ",
      ByteSize(static_cast<int64_t>(need)), " in this process, more than 90% of the ",
      ByteSize(available),
      " free: lower --max_model_len (the longest prompt + completion to serve) or --max_batch, "
      "or set --kv_cache_tokens"));
}

std::string ByteSize(int64_t bytes) {
  if (bytes >= 1000000000) return absl::StrFormat("%.1f GB", bytes / 1e9);
  if (bytes >= 1000000) return absl::StrFormat("%.1f MB", bytes / 1e6);
  return absl::StrFormat("%.1f kB", bytes / 1e3);
}

}  // namespace eellm
