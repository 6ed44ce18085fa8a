// A cuDNN backend-API operation graph (cudnn_graph.h, no frontend library): tensors, the
// pointwise, matmul and reduction operations that the attention graphs (cudnn_attention.h) are
// made of, and the plan the heuristic picks for them. Building records the first failing call
// (its name and cuDNN's message) and skips the rest, so a graph is written as a plain sequence
// of calls and checked once at Build. Only engine/cuda/cudnn_*.cc include this (it needs
// cudnn.h, which only real CUDA builds with cuDNN have).
#pragma once

#include <cudnn.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace eellm::cuda::cudnn {

// Owns one cudnnBackendDescriptor_t (destroyed with it); move-only.
class Descriptor {
 public:
  Descriptor() = default;
  explicit Descriptor(cudnnBackendDescriptorType_t type);
  ~Descriptor();
  Descriptor(Descriptor&& o) noexcept : d_(o.d_), created_(o.created_) { o.d_ = nullptr; }
  Descriptor& operator=(Descriptor&& o) noexcept;
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  // The status of creation (cuDNN may refuse a descriptor type).
  cudnnStatus_t created() const { return created_; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
  cudnnStatus_t created_ = CUDNN_STATUS_SUCCESS;
};

// A finalized execution plan and the workspace bytes it needs, with the operation graph and the
// engine configuration it was built from (kept alive with it, as the cuDNN frontend keeps them).
// (A plan for device properties, Graph's second constructor, where no CUDA driver is but the
// toolkit's stub, stops after compiling: workspace -1, `plan` not finalized, not to be run.)
struct Plan {
  Descriptor graph, config, plan;
  int64_t workspace = 0;
  std::string engine;  // which engine (its global index) and the heuristic's rank, for messages
};

// A device-property descriptor from its JSON text (the GPU's limits: compute capability as
// deviceVer, SM count, shared memory, ...; e.g. tests/cudnn/h200_sxm.json): a graph built for it
// gets cuDNN's heuristics and plans without that GPU (cuDNN >= 9.8), which checks a graph
// where no GPU is.
absl::StatusOr<Descriptor> DeviceProperties(const std::string& json);
// The JSON text of the handle's GPU's device properties (what DeviceProperties takes).
absl::StatusOr<std::string> DevicePropertiesJson(cudnnHandle_t handle);

class Graph {
 public:
  // Caller memory, intermediate, host scalar; kAccumulator: caller memory a fused kernel adds its
  // products into (by atomics: cuDNN's dQ accumulator), which the caller zeroes first (to cuDNN
  // a kIo tensor; the CPU emulation's interpreter adds into it).
  enum class Kind { kIo, kVirtual, kByValue, kAccumulator };
  // A graph for the handle's GPU (plans that run), or, with a null handle and a finalized
  // device-property descriptor `device` (kept by the caller while the graph lives), for that
  // GPU without it (plans that finalize, for checks; not run).
  explicit Graph(cudnnHandle_t handle, cudnnBackendDescriptor_t device = nullptr)
      : handle_(handle), device_(device) {}

  // A tensor of `dims` with `strides` (elements); all but virtual tensors need a caller-chosen
  // uid (> 0, unique in the graph: the variant pack names them by it), virtual ones get one
  // above 1000. Returns the uid.
  int64_t Tensor(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
                 cudnnDataType_t type, Kind kind, int64_t uid = 0);
  // A virtual fp32 tensor of `dims`, packed (last dimension fastest).
  int64_t Virtual(const std::vector<int64_t>& dims, cudnnDataType_t type = CUDNN_DATA_FLOAT);

  // y = mode(x[, b[, t]]) with `math` precision (fp32; BOOLEAN for comparisons); GEN_INDEX takes
  // `axis` (the dimension whose index it writes); BINARY_SELECT is y = t ? x : b.
  void Pointwise(cudnnPointwiseMode_t mode, int64_t y, int64_t x, int64_t b = 0, int64_t t = 0,
                 int64_t axis = -1, cudnnDataType_t math = CUDNN_DATA_FLOAT);
  // c = a b over the last two dimensions (fp32 accumulation), batched over the first two.
  void Matmul(int64_t c, int64_t a, int64_t b);
  // y = reduce(x) (fp32): over the dimensions where y has extent 1, and over groups of x's
  // extent / y's where y's extent divides x's (the heads of a GQA group).
  void Reduction(cudnnReduceTensorOp_t op, int64_t y, int64_t x);
  // y = x seen through y's dimensions and strides (a transpose when the strides swap).
  void Reshape(int64_t y, int64_t x);

  // The first failure so far (building needs no handle up to here: tensor and operation
  // descriptors are checked and finalized without a device).
  const absl::Status& status() const { return status_; }

  // The operation graph, then heuristic A's engine configurations in order (the fallback
  // heuristic's where none of A's finalizes): the first whose plan finalizes; or the first error
  // recorded while building, or why no plan finalized.
  absl::StatusOr<Plan> Build();

  // A dims vector's packed strides (last dimension fastest).
  static std::vector<int64_t> Packed(const std::vector<int64_t>& dims) {
    std::vector<int64_t> s(dims.size(), 1);
    for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * dims[i + 1];
    return s;
  }

 private:
  // Records the first failure of `what`.
  bool Check(cudnnStatus_t s, const char* what);
  Descriptor Make(cudnnBackendDescriptorType_t type, const char* what);
  void Set(const Descriptor& d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
           int64_t count, const void* values, const char* what);
  void Finalize(const Descriptor& d, const char* what);
  // An attribute whose value is one descriptor; one whose value is the tensor `uid`.
  void SetDescriptor(const Descriptor& d, cudnnBackendAttributeName_t name,
                     cudnnBackendDescriptor_t value, const char* what);
  void SetTensor(const Descriptor& op, cudnnBackendAttributeName_t name, int64_t uid,
                 const char* what);
  const Descriptor& TensorDesc(int64_t uid);

  cudnnHandle_t handle_;
  cudnnBackendDescriptor_t device_;
  absl::Status status_;
  std::vector<int64_t> uids_;  // tensors_[i] has uid uids_[i]
  std::vector<Descriptor> tensors_;
  std::vector<Descriptor> ops_;
  std::vector<Descriptor> op_params_;  // the pointwise/matmul/reduction descriptors ops refer to
  int64_t next_virtual_uid_ = 1001;
};

// Runs `plan` with the tensors `uids` at `pointers` (device memory; host memory for by-value
// tensors) and `workspace` (plan.workspace bytes, device) on the handle's stream.
absl::Status Execute(cudnnHandle_t handle, const Plan& plan, const std::vector<int64_t>& uids,
                     const std::vector<void*>& pointers, void* workspace);

}  // namespace eellm::cuda::cudnn
