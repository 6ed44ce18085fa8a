// MakeBackend: the factory that turns a device name ("cpu", "cuda") into a Backend.
#include "engine/backend.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#ifdef EELLM_HAVE_CUDA
#include "engine/cuda/make_cuda_backend.h"
#endif

namespace eellm {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name) {
  if (name == "cpu") return std::unique_ptr<Backend>(std::make_unique<CpuBackend>());
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
#ifdef EELLM_HAVE_CUDA
    int device = -1;
    if (name.size() > 5 && !absl::SimpleAtoi(name.substr(5), &device)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad backend \"", name, "\": expected cuda or cuda:<device>"));
    }
    return MakeCudaBackend(device);
#else
    return absl::UnimplementedError(
        "this eellm was built without CUDA (nvcc was not found at configure time)");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend \"", name, "\"; valid backends: cpu, cuda, cuda:<device>"));
}

}  // namespace eellm
