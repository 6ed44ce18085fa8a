// The cuDNN backend-API graph builder of cudnn_graph.h.
#include "engine/cuda/cudnn_graph.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace eellm::cuda::cudnn {

Descriptor::Descriptor(cudnnBackendDescriptorType_t type) {
  created_ = cudnnBackendCreateDescriptor(type, &d_);
  if (created_ != CUDNN_STATUS_SUCCESS) d_ = nullptr;
}

Descriptor::~Descriptor() {
  if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
}

Descriptor& Descriptor::operator=(Descriptor&& o) noexcept {
  if (this != &o) {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
    d_ = o.d_;
    created_ = o.created_;
    o.d_ = nullptr;
  }
  return *this;
}

absl::StatusOr<Descriptor> DeviceProperties(const std::string& json) {
  Descriptor d(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
  cudnnStatus_t s = d.created();
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(d.get(), CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
                                 CUDNN_TYPE_CHAR, static_cast<int64_t>(json.size()), json.data());
  }
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(d.get());
  if (s != CUDNN_STATUS_SUCCESS) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuDNN device properties: ", cudnnGetErrorString(s),
                     " (CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr names the field)"));
  }
  return d;
}

absl::StatusOr<std::string> DevicePropertiesJson(cudnnHandle_t handle) {
  Descriptor d(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
  cudnnStatus_t s = d.created();
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(d.get(), CUDNN_ATTR_DEVICEPROP_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                 &handle);
  }
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(d.get());
  int64_t n = 0;
  std::string json(1 << 16, '\0');
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendGetAttribute(d.get(), CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
                                 CUDNN_TYPE_CHAR, static_cast<int64_t>(json.size()), &n,
                                 json.data());
  }
  if (s != CUDNN_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("cuDNN device properties: ", cudnnGetErrorString(s)));
  }
  json.resize(std::min<size_t>(json.size(), static_cast<size_t>(n)));
  while (!json.empty() && json.back() == '\0') json.pop_back();
  return json;
}

bool Graph::Check(cudnnStatus_t s, const char* what) {
  if (s == CUDNN_STATUS_SUCCESS) return true;
  if (status_.ok()) {
    status_ = absl::InternalError(absl::StrCat("cuDNN ", what, ": ", cudnnGetErrorString(s)));
  }
  return false;
}

Descriptor Graph::Make(cudnnBackendDescriptorType_t type, const char* what) {
  Descriptor d(type);
  Check(d.created(), what);
  return d;
}

void Graph::Set(const Descriptor& d, cudnnBackendAttributeName_t name,
                cudnnBackendAttributeType_t type, int64_t count, const void* values,
                const char* what) {
  if (!status_.ok() || d.get() == nullptr) return;
  Check(cudnnBackendSetAttribute(d.get(), name, type, count, values), what);
}

void Graph::Finalize(const Descriptor& d, const char* what) {
  if (!status_.ok() || d.get() == nullptr) return;
  Check(cudnnBackendFinalize(d.get()), what);
}

int64_t Graph::Tensor(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
                      cudnnDataType_t type, Kind kind, int64_t uid) {
  if (kind == Kind::kVirtual) uid = next_virtual_uid_++;
  if (uid <= 0 && status_.ok()) status_ = absl::InternalError("cuDNN graph: a tensor without uid");
  Descriptor t = Make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor descriptor");
  const int64_t alignment = 16;
  const bool is_virtual = kind == Kind::kVirtual, by_value = kind == Kind::kByValue;
  Set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, "tensor data type");
  Set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, static_cast<int64_t>(dims.size()),
      dims.data(), "tensor dimensions");
  Set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, static_cast<int64_t>(strides.size()),
      strides.data(), "tensor strides");
  Set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, "tensor uid");
  Set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment, "tensor alignment");
  Set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual, "tensor virtual");
  if (by_value) {
    Set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value, "tensor by value");
  }
  Finalize(t, "tensor finalize");
  uids_.push_back(uid);
  tensors_.push_back(std::move(t));
  return uid;
}

int64_t Graph::Virtual(const std::vector<int64_t>& dims, cudnnDataType_t type) {
  return Tensor(dims, Packed(dims), type, Kind::kVirtual);
}

const Descriptor& Graph::TensorDesc(int64_t uid) {
  for (size_t i = 0; i < uids_.size(); ++i) {
    if (uids_[i] == uid) return tensors_[i];
  }
  if (status_.ok()) status_ = absl::InternalError(absl::StrCat("cuDNN graph: no tensor ", uid));
  static const Descriptor kNone;
  return kNone;
}

void Graph::SetDescriptor(const Descriptor& d, cudnnBackendAttributeName_t name,
                          cudnnBackendDescriptor_t value, const char* what) {
  Set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value, what);
}

void Graph::SetTensor(const Descriptor& op, cudnnBackendAttributeName_t name, int64_t uid,
                      const char* what) {
  SetDescriptor(op, name, TensorDesc(uid).get(), what);
}

void Graph::Pointwise(cudnnPointwiseMode_t mode, int64_t y, int64_t x, int64_t b, int64_t t,
                      int64_t axis, cudnnDataType_t math) {
  Descriptor pw = Make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise descriptor");
  Set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, "pointwise mode");
  Set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &math, "pointwise precision");
  if (axis >= 0) Set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis, "pointwise axis");
  Finalize(pw, "pointwise finalize");
  Descriptor op = Make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise operation");
  SetDescriptor(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.get(),
                "pointwise op descriptor");
  SetTensor(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x, "pointwise x");
  if (b != 0) SetTensor(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b, "pointwise b");
  if (t != 0) SetTensor(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t, "pointwise t");
  SetTensor(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y, "pointwise y");
  const float one = 1.0f;
  Set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha1");
  Set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha2");
  Finalize(op, "pointwise operation finalize");
  op_params_.push_back(std::move(pw));
  ops_.push_back(std::move(op));
}

void Graph::Matmul(int64_t c, int64_t a, int64_t b) {
  Descriptor mm = Make(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul descriptor");
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  const double padding = 0.0;
  Set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, "matmul compute type");
  Set(mm, CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 1, &padding, "matmul padding");
  Finalize(mm, "matmul finalize");
  Descriptor op = Make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul operation");
  SetTensor(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a, "matmul a");
  SetTensor(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b, "matmul b");
  SetTensor(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c, "matmul c");
  SetDescriptor(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.get(), "matmul desc");
  Finalize(op, "matmul operation finalize");
  op_params_.push_back(std::move(mm));
  ops_.push_back(std::move(op));
}

void Graph::Reduction(cudnnReduceTensorOp_t reduce, int64_t y, int64_t x) {
  Descriptor rd = Make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction descriptor");
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  Set(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce,
      "reduction operator");
  const bool deterministic = false;  // (as the frontend sends it; the fused kernel decides)
  Set(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, "reduction type");
  Set(rd, CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, CUDNN_TYPE_BOOLEAN, 1, &deterministic,
      "reduction deterministic");
  Finalize(rd, "reduction finalize");
  Descriptor op = Make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction operation");
  SetTensor(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x, "reduction x");
  SetTensor(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y, "reduction y");
  SetDescriptor(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd.get(), "reduction desc");
  Finalize(op, "reduction operation finalize");
  op_params_.push_back(std::move(rd));
  ops_.push_back(std::move(op));
}

void Graph::Reshape(int64_t y, int64_t x) {
  Descriptor op = Make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "reshape operation");
  SetTensor(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x, "reshape x");
  SetTensor(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y, "reshape y");
  Finalize(op, "reshape operation finalize");
  ops_.push_back(std::move(op));
}

namespace {
// What an engine configuration's engine says of itself: its global index (-1 where cuDNN does not
// say) and whether its numerical notes call it nondeterministic.
struct EngineFacts {
  int64_t index = -1;
  bool nondeterministic = false;
};
EngineFacts Facts(cudnnBackendDescriptor_t config) {
  EngineFacts f;
  Descriptor engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  cudnnBackendDescriptor_t e = engine.get();
  int64_t n = 0;
  if (e == nullptr ||
      cudnnBackendGetAttribute(config, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                               1, &n, &e) != CUDNN_STATUS_SUCCESS) {
    return f;
  }
  if (cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                               &f.index) != CUDNN_STATUS_SUCCESS) {
    f.index = -1;
  }
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  if (cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &n,
                               notes) == CUDNN_STATUS_SUCCESS) {
    for (int64_t i = 0; i < n; ++i) {
      if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) f.nondeterministic = true;
    }
  }
  return f;
}

const char* ModeName(cudnnBackendHeurMode_t mode) {
  return mode == CUDNN_HEUR_MODE_A ? "heuristic A" : "fallback heuristic";
}

// The first engine configuration of the heuristic `mode` for `graph` whose plan finalizes; or why
// none did.
// (For the handle's GPU, or for the device-property descriptor `device` where handle is null.)
absl::StatusOr<Plan> FirstPlan(cudnnHandle_t handle, cudnnBackendDescriptor_t device,
                               cudnnBackendDescriptor_t graph, cudnnBackendHeurMode_t mode) {
  auto fail = [&](const char* what, cudnnStatus_t s) {
    return absl::NotFoundError(
        absl::StrCat(ModeName(mode), ": ", what, ": ", cudnnGetErrorString(s)));
  };
  Descriptor heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  cudnnStatus_t s = heur.created();
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
  }
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1,
                                 &mode);
  }
  if (s == CUDNN_STATUS_SUCCESS && handle == nullptr) {
    s = cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_DEVICEPROP,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &device);
  }
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(heur.get());
  if (s != CUDNN_STATUS_SUCCESS) return fail("heuristics", s);
  // The configurations: their number, then that many descriptors for the heuristic to fill.
  int64_t count = 0;
  s = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                               CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr);
  if (s != CUDNN_STATUS_SUCCESS) return fail("heuristics result count", s);
  std::vector<Descriptor> configs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    configs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    if (configs.back().created() != CUDNN_STATUS_SUCCESS) {
      return fail("engine config", configs.back().created());
    }
    raw.push_back(configs.back().get());
  }
  int64_t filled = 0;
  if (count > 0) {
    s = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &filled, raw.data());
    if (s != CUDNN_STATUS_SUCCESS) return fail("heuristics results", s);
  }
  count = std::min(count, filled);
  std::string tried;
  for (int64_t i = 0; i < count; ++i) {
    Plan p;
    p.plan = Descriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    p.config = std::move(configs[i]);
    if (p.plan.get() == nullptr) continue;
    cudnnBackendDescriptor_t cfg = raw[i];
    const cudnnStatus_t target =
        handle != nullptr
            ? cudnnBackendSetAttribute(p.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                                       CUDNN_TYPE_HANDLE, 1, &handle)
            : cudnnBackendSetAttribute(p.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &device);
    if (target != CUDNN_STATUS_SUCCESS ||
        cudnnBackendSetAttribute(p.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg) != CUDNN_STATUS_SUCCESS) {
      continue;
    }
    const cudnnStatus_t fin = cudnnBackendFinalize(p.plan.get());
    const EngineFacts facts = Facts(cfg);
    const std::string chosen =
        absl::StrCat("engine ", facts.index, facts.nondeterministic ? " (nondeterministic)" : "",
                     ", the ", ModeName(mode), "'s choice ", i + 1, " of ", count);
    if (fin == CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER && handle == nullptr) {
      // Built for device properties where the CUDA driver is only the toolkit's stub: the plan
      // compiled and its kernels could not be loaded, which is as far as it goes without a GPU.
      p.workspace = -1;
      p.engine = chosen + ", compiled (its kernels load only with a CUDA driver)";
      return p;
    }
    if (fin != CUDNN_STATUS_SUCCESS) {
      absl::StrAppend(&tried, tried.empty() ? "" : "; ", "engine ", facts.index, ": ",
                      cudnnGetErrorString(fin));
      continue;
    }
    int64_t ws_count = 0;
    if (cudnnBackendGetAttribute(p.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                 CUDNN_TYPE_INT64, 1, &ws_count,
                                 &p.workspace) != CUDNN_STATUS_SUCCESS) {
      continue;
    }
    p.engine = chosen;
    return p;
  }
  return absl::NotFoundError(absl::StrCat(ModeName(mode), ": ", count, " configurations",
                                          tried.empty() ? "" : " (" + tried + ")",
                                          ", no plan finalized"));
}
}  // namespace

absl::StatusOr<Plan> Graph::Build() {
  if (!status_.ok()) return status_;
  if (handle_ == nullptr && device_ == nullptr) {
    return absl::FailedPreconditionError("cuDNN graph: no handle and no device properties");
  }
  Descriptor graph = Make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
  std::vector<cudnnBackendDescriptor_t> ops;
  for (const Descriptor& op : ops_) ops.push_back(op.get());
  if (handle_ != nullptr) {  // (deprecated in cuDNN 9: a graph for a device property has none)
    Set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle_, "graph handle");
  }
  Set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
      static_cast<int64_t>(ops.size()), ops.data(), "graph operations");
  Finalize(graph, "operation graph finalize");
  if (!status_.ok()) return status_;
  // Heuristic A's choices (the frontend's default), else the fallback heuristic's.
  std::string why;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    absl::StatusOr<Plan> p = FirstPlan(handle_, device_, graph.get(), mode);
    if (p.ok()) {
      p->graph = std::move(graph);
      return p;
    }
    absl::StrAppend(&why, why.empty() ? "" : "; ", p.status().message());
  }
  return absl::NotFoundError(absl::StrCat("cuDNN has no engine for the graph (", why, ")"));
}

absl::Status Execute(cudnnHandle_t handle, const Plan& plan, const std::vector<int64_t>& uids,
                     const std::vector<void*>& pointers, void* workspace) {
  Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  cudnnStatus_t s = pack.created();
  const auto n = static_cast<int64_t>(uids.size());
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                                 n, uids.data());
  }
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                                 CUDNN_TYPE_VOID_PTR, n, pointers.data());
  }
  if (s == CUDNN_STATUS_SUCCESS) {
    s = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR,
                                 1, &workspace);
  }
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(pack.get());
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendExecute(handle, plan.plan.get(), pack.get());
  if (s != CUDNN_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("cuDNN execute: ", cudnnGetErrorString(s)));
  }
  return absl::OkStatus();
}

}  // namespace eellm::cuda::cudnn
