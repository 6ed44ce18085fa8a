// engine/cuda/cuda_backend.cc built for the CPU emulation of CUDA (see cuda_emulation.h,
// emulated_names.h).
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cuda_backend.cc"
// clang-format on

#include "absl/strings/match.h"

namespace eellm {
int64_t EmulatedCudaMallocCalls() { return eellm_emu::g_malloc_calls; }
int64_t EmulatedHostWaits() { return eellm_emu::g_host_waits; }

absl::StatusOr<std::unique_ptr<Backend>> MakeBackendOrEmulated(absl::string_view name) {
  if (!absl::StartsWith(name, "emulated-cuda")) return MakeBackend(name);
  constexpr absl::string_view kPrefix = "emulated-cuda";
  const absl::string_view rest = name.substr(kPrefix.size());
  if (rest != "" && rest != "-bf16" && rest != "-bf16w") {
    return absl::InvalidArgumentError(
        absl::StrCat("bad backend \"", name,
                     "\": expected emulated-cuda, emulated-cuda-bf16 or "
                     "emulated-cuda-bf16w"));
  }
  return MakeEmulatedCudaBackend(0, rest != "", rest == "-bf16w");
}
}  // namespace eellm
