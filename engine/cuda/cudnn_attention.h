// Causal self-attention of the training path on cuDNN's fused flash attention, reached through
// cuDNN's backend graph API (cudnn_graph.h; the graphs of the cuDNN frontend's SDPA, built here):
// forward with the rows' log-sum-exps, and a backward whose dQ is written by its matmul (no
// atomic accumulator: deterministic), in the layouts of Backend::AttentionForward and
// AttentionBackward (q [b, t, hq, d], k and v [b, t, hkv, d] with GQA, lse [b, hq, t]), all
// bf16 but the fp32 lse. Each shape's plan is built at its first call and kept (a training step
// repeats one shape); a shape cuDNN has no plan for is remembered, said once on stderr, and the
// call returns false, so the caller runs its own kernels (flash_attention.cu), as with LtGemm.
// Builds without cuDNN get Create() == null; the CPU emulation of CUDA runs the graphs on an
// interpreter (tests/gpu/emu/emulated_cudnn_graph.cc).
// EELLM_CUDNN_ATTENTION=0 turns it off (to compare with the fused kernels in one command);
// EELLM_CUDNN_ATTENTION=any also allows, where cuDNN has no plan for the deterministic backward,
// the cuDNN frontend's default one (dQ summed in an fp32 accumulator by atomics: not
// deterministic); EELLM_CUDNN_ATTENTION=accumulating runs that one wherever it has a plan (to
// time the two in one command; the deterministic one where it has none).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace eellm::cuda {

// One attention call's sizes: b sequences of t tokens, hq query heads, hkv KV heads, head dim d;
// the row strides of q (and dq) and of k, v (and dk, dv): 0 for dense, hq d and hkv d (out, dout
// are dense).
struct AttentionShape {
  int b = 0, t = 0, hq = 0, hkv = 0, d = 0;
  int q_stride = 0, kv_stride = 0;
  int q_row() const { return q_stride > 0 ? q_stride : hq * d; }
  int kv_row() const { return kv_stride > 0 ? kv_stride : hkv * d; }
  bool operator<(const AttentionShape& o) const {
    return std::tie(b, t, hq, hkv, d, q_stride, kv_stride) <
           std::tie(o.b, o.t, o.hq, o.hkv, o.d, o.q_stride, o.kv_stride);
  }
};

class CudnnAttention {
 public:
  // The graphs: forward, the deterministic backward (dQ written by its matmul) and the backward
  // with an fp32 dQ accumulator (atomics).
  enum class Pass { kForward, kBackward, kBackwardAccumulatingDq };

  // Null where this build has no cuDNN or EELLM_CUDNN_ATTENTION=0. (The cuDNN handle is made at
  // the first call, on `stream`.)
  static std::unique_ptr<CudnnAttention> Create(cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // The shapes offered to cuDNN: d a multiple of 8 in [64, 128], hq a multiple of hkv, t >= 2
  // (smaller heads stay on the fused kernels, which the CPU emulation checks).
  static bool Offered(const AttentionShape& s);

  // Builds the graph of `pass` for s without a device, down to its finalized tensor and
  // operation descriptors, which cuDNN checks there (dims, strides, types, what each operation
  // accepts); OK, or the first refusal; Unimplemented in builds without cuDNN. (PlanFor goes on
  // to engines and plans.)
  static absl::Status CheckGraph(const AttentionShape& s, Pass pass);

  // The plan cuDNN builds for `pass` at s on the GPU that `device_json` describes (a cuDNN
  // device-property JSON, cudnn_graph.h's DeviceProperties), without that GPU: the engine
  // chosen and the workspace it needs with ours; or why there is none (Unimplemented in builds
  // without cuDNN). Where the CUDA driver is the toolkit's stub, cuDNN compiles the plan but
  // cannot load it, and the workspace is not known (-1).
  struct PlanInfo {
    std::string engine;
    int64_t workspace_bytes = -1;
  };
  static absl::StatusOr<PlanInfo> PlanFor(const AttentionShape& s, Pass pass,
                                          const std::string& device_json);

  // This machine's first GPU's device properties as cuDNN's JSON (what PlanFor takes); an
  // error where there is no GPU, Unimplemented in builds without cuDNN.
  static absl::StatusOr<std::string> DeviceJson();

  // out = softmax(q k^T / sqrt(d), causal) v and lse; true when run, false (nothing run) when
  // cuDNN has no plan for the shape. Pointers 16-byte aligned.
  bool Forward(void* out, float* lse, const void* q, const void* k, const void* v,
               const AttentionShape& s);
  // dq, dk, dv from dout and the forward's out and lse (dk, dv summed over each KV head's query
  // heads); true when run, as Forward.
  bool Backward(void* dq, void* dk, void* dv, const void* dout, const void* out, const float* lse,
                const void* q, const void* k, const void* v, const AttentionShape& s);

 private:
  struct Impl;
  explicit CudnnAttention(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace eellm::cuda
