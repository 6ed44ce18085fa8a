// MakeBackend: the factory that turns a device name ("cpu", "cuda") into a Backend.
#include "engine/backend.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"

namespace eellm {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name) {
  if (name == "cpu") return std::unique_ptr<Backend>(std::make_unique<CpuBackend>());
  if (name == "cuda") return absl::UnimplementedError("CUDA backend not built");
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend \"", name, "\"; valid backends: cpu, cuda"));
}

}  // namespace eellm
