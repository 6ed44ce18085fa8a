// engine/cuda/cudnn_graph.h's Graph for the CPU emulation of CUDA: instead of cuDNN's backend
// descriptors, the graph records its tensors and operations, and Execute interprets them on the
// stream (deferred like a kernel), with the semantics cudnn_attention.cc builds on:
// - a tensor is 4-d with strides in elements; a virtual one holds its values (fp32, rounded to
//   bf16 when it is bf16); a caller's (I/O) one is read and written through its strides in its
//   type; a by-value one is a host scalar, read when Execute is called;
// - pointwise operations broadcast inputs of extent 1; GEN_INDEX writes the index along `axis`;
//   BINARY_SELECT is y = t ? x : b;
// - a matmul multiplies the last two dimensions (fp32 accumulation, here in double), batched
//   over the first two, where an operand of smaller extent serves a group of the output's
//   (GQA: query head h reads KV head h * hkv / hq); into an accumulator (Kind::kAccumulator:
//   the backward's dQ accumulator) it adds to what the memory holds, as cuDNN's atomics do (the
//   caller zeroes it);
// - a reduction sums (or takes the maximum) over the dimensions where y has extent 1 and over
//   groups where y's extent divides x's (the query heads of a KV head);
// - a reshape reads x's storage (a virtual tensor's packed values, an I/O tensor's memory)
//   through y's strides: with swapped strides, a transpose.
// (That cuDNN accepts these graphs and has a fused engine for them is checked against the real
// library in tests/cudnn; this checks what they compute against the CPU backend.)
#include "tests/gpu/emu/emulated_names.h"
// clang-format off
#include "engine/cuda/cudnn_graph.h"
// clang-format on

#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/gpu/emu/cuda_emulation.h"

namespace eellm_emu {
struct TensorRecord {
  std::vector<int64_t> dims, strides;
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  eellm::cuda::cudnn::Graph::Kind kind = eellm::cuda::cudnn::Graph::Kind::kVirtual;
  int64_t uid = 0;
};
enum class OpKind { kPointwise, kMatmul, kReduction, kReshape };
struct OpRecord {
  OpKind kind = OpKind::kPointwise;
  int mode = 0;  // cudnnPointwiseMode_t or cudnnReduceTensorOp_t
  int64_t y = 0, x = 0, b = 0, t = 0, axis = -1;
};
}  // namespace eellm_emu

// A descriptor: a tensor, an operation, or (a plan's graph) all of a graph's.
struct cudnnBackendDescriptor_st {
  std::vector<eellm_emu::TensorRecord> tensors;
  std::vector<eellm_emu::OpRecord> ops;
};

namespace eellm::cuda::cudnn {

using eellm_emu::OpKind;
using eellm_emu::OpRecord;
using eellm_emu::TensorRecord;

Descriptor::Descriptor(cudnnBackendDescriptorType_t) : d_(new cudnnBackendDescriptor_st) {}
Descriptor::~Descriptor() { delete d_; }
Descriptor& Descriptor::operator=(Descriptor&& o) noexcept {
  if (this != &o) {
    delete d_;
    d_ = o.d_;
    created_ = o.created_;
    o.d_ = nullptr;
  }
  return *this;
}

int64_t Graph::Tensor(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
                      cudnnDataType_t type, Kind kind, int64_t uid) {
  if (kind == Kind::kVirtual) uid = next_virtual_uid_++;
  if (!status_.ok()) return uid;
  if (dims.size() != 4 || strides.size() != 4) {
    status_ = absl::InvalidArgumentError(absl::StrCat("tensor ", uid, ": not 4-d"));
  }
  for (int64_t u : uids_) {
    if (u == uid) status_ = absl::InvalidArgumentError(absl::StrCat("tensor ", uid, " twice"));
  }
  Descriptor d(CUDNN_BACKEND_EMULATED_DESCRIPTOR);
  d.get()->tensors.push_back({dims, strides, type, kind, uid});
  uids_.push_back(uid);
  tensors_.push_back(std::move(d));
  return uid;
}

int64_t Graph::Virtual(const std::vector<int64_t>& dims, cudnnDataType_t type) {
  return Tensor(dims, Packed(dims), type, Kind::kVirtual);
}

namespace {
// Records an operation whose tensors the graph must already have.
void Record(std::vector<Descriptor>& ops, const std::vector<int64_t>& uids, absl::Status& status,
            OpRecord op) {
  for (int64_t u : {op.y, op.x, op.b, op.t}) {
    if (u == 0) continue;
    if (std::find(uids.begin(), uids.end(), u) == uids.end() && status.ok()) {
      status = absl::InvalidArgumentError(absl::StrCat("operation on unknown tensor ", u));
    }
  }
  Descriptor d(CUDNN_BACKEND_EMULATED_DESCRIPTOR);
  d.get()->ops.push_back(op);
  ops.push_back(std::move(d));
}
}  // namespace

void Graph::Pointwise(cudnnPointwiseMode_t mode, int64_t y, int64_t x, int64_t b, int64_t t,
                      int64_t axis, cudnnDataType_t) {
  Record(ops_, uids_, status_, {OpKind::kPointwise, mode, y, x, b, t, axis});
}
void Graph::Matmul(int64_t c, int64_t a, int64_t b) {
  Record(ops_, uids_, status_, {OpKind::kMatmul, 0, c, a, b, 0, -1});
}
void Graph::Reduction(cudnnReduceTensorOp_t op, int64_t y, int64_t x) {
  Record(ops_, uids_, status_, {OpKind::kReduction, op, y, x, 0, 0, -1});
}
void Graph::Reshape(int64_t y, int64_t x) {
  Record(ops_, uids_, status_, {OpKind::kReshape, 0, y, x, 0, 0, -1});
}

absl::StatusOr<Plan> Graph::Build() {
  if (!status_.ok()) return status_;
  Plan plan;
  plan.graph = Descriptor(CUDNN_BACKEND_EMULATED_DESCRIPTOR);
  for (const Descriptor& t : tensors_) plan.graph.get()->tensors.push_back(t.get()->tensors[0]);
  for (const Descriptor& o : ops_) plan.graph.get()->ops.push_back(o.get()->ops[0]);
  plan.workspace = 0;
  plan.engine = "emulated graph";
  return plan;
}

absl::StatusOr<Descriptor> DeviceProperties(const std::string&) {
  return absl::UnimplementedError("the CUDA emulation has no cuDNN device properties");
}
absl::StatusOr<std::string> DevicePropertiesJson(cudnnHandle_t) {
  return absl::UnimplementedError("the CUDA emulation has no cuDNN device properties");
}

namespace {

using Kind = Graph::Kind;

// A graph the interpreter would compute but cuDNN may not as it does: aborts, naming it.
[[noreturn]] void Refuse(const char* what) {
  std::fprintf(stderr, "emulated cuDNN: %s\n", what);
  std::abort();
}

float RoundTo(cudnnDataType_t type, double v) {
  if (type == CUDNN_DATA_BFLOAT16) return __bfloat162float(__float2bfloat16(static_cast<float>(v)));
  return static_cast<float>(v);
}

// One run of a recorded graph: virtual tensors' values, the caller's pointers and scalars.
class Interpreter {
 public:
  Interpreter(const cudnnBackendDescriptor_st& g, std::map<int64_t, void*> io,
              std::map<int64_t, float> scalars)
      : io_(std::move(io)), scalars_(std::move(scalars)) {
    for (const TensorRecord& t : g.tensors) {
      tensors_[t.uid] = t;
      if (t.kind == Kind::kVirtual) values_[t.uid].assign(Count(t), 0.0f);
    }
  }

  void Run(const std::vector<OpRecord>& ops) {
    for (const OpRecord& op : ops) {
      switch (op.kind) {
        case OpKind::kPointwise:
          Pointwise(op);
          break;
        case OpKind::kMatmul:
          Matmul(op);
          break;
        case OpKind::kReduction:
          Reduction(op);
          break;
        case OpKind::kReshape:
          Reshape(op);
          break;
      }
    }
  }

 private:
  using Index = std::array<int64_t, 4>;
  // A tensor's storage and the strides its logical elements lie at: a virtual tensor's packed
  // values, a caller's memory at its strides, a by-value scalar (all strides 0). As an input,
  // dimensions of extent 1 broadcast (stride 0).
  struct View {
    const TensorRecord* t = nullptr;
    float* values = nullptr;
    void* memory = nullptr;
    float scalar = 0;
    Index strides{};
    float At(int64_t at) const {
      if (values != nullptr) return values[at];
      if (memory == nullptr) return scalar;
      return t->type == CUDNN_DATA_BFLOAT16
                 ? __bfloat162float(static_cast<const __nv_bfloat16*>(memory)[at])
                 : static_cast<const float*>(memory)[at];
    }
    void Put(int64_t at, double v) const {
      const float r = RoundTo(t->type, v);
      if (values != nullptr) {
        values[at] = r;
      } else if (t->type == CUDNN_DATA_BFLOAT16) {
        static_cast<__nv_bfloat16*>(memory)[at] = __float2bfloat16(r);
      } else {
        static_cast<float*>(memory)[at] = r;
      }
    }
    int64_t Offset(const Index& i) const {
      return i[0] * strides[0] + i[1] * strides[1] + i[2] * strides[2] + i[3] * strides[3];
    }
    float Get(const Index& i) const { return At(Offset(i)); }
  };
  static int64_t Count(const TensorRecord& t) {
    return t.dims[0] * t.dims[1] * t.dims[2] * t.dims[3];
  }
  // u's storage with its own strides (what a reshape reads through other strides).
  View Storage(int64_t u) {
    View v;
    v.t = &tensors_.at(u);
    if (v.t->kind == Kind::kVirtual) {
      v.values = values_.at(u).data();
      const std::vector<int64_t> packed = Graph::Packed(v.t->dims);
      for (int d = 0; d < 4; ++d) v.strides[d] = packed[d];
    } else if (v.t->kind == Kind::kByValue) {
      v.scalar = scalars_.at(u);
    } else {
      v.memory = io_.at(u);
      for (int d = 0; d < 4; ++d) v.strides[d] = v.t->strides[d];
    }
    return v;
  }
  // u as an input of an operation whose output is `out`: each dimension of u's extent or 1.
  View Input(int64_t u, const std::vector<int64_t>& out) {
    View v = Storage(u);
    for (int d = 0; d < 4; ++d) {
      if (v.t->dims[d] == 1) {
        v.strides[d] = 0;
      } else if (v.t->dims[d] != out[d]) {
        Refuse("a pointwise input's extent is neither the output's nor 1");
      }
    }
    return v;
  }
  template <typename F>
  static void Each(const std::vector<int64_t>& dims, F f) {
    Index i{};
    for (i[0] = 0; i[0] < dims[0]; ++i[0])
      for (i[1] = 0; i[1] < dims[1]; ++i[1])
        for (i[2] = 0; i[2] < dims[2]; ++i[2])
          for (i[3] = 0; i[3] < dims[3]; ++i[3]) f(i);
  }

  void Pointwise(const OpRecord& op) {
    const View y = Storage(op.y);
    const bool gen = op.mode == CUDNN_POINTWISE_GEN_INDEX;
    const std::vector<int64_t>& out = y.t->dims;
    const View x = gen ? View{} : Input(op.x, out);
    const View b = op.b != 0 ? Input(op.b, out) : View{};
    const View t = op.t != 0 ? Input(op.t, out) : View{};
    Each(y.t->dims, [&](const Index& i) {
      const double xv = gen ? 0.0 : x.Get(i);
      double v = 0;
      switch (op.mode) {
        case CUDNN_POINTWISE_ADD:
          v = xv + b.Get(i);
          break;
        case CUDNN_POINTWISE_SUB:
          v = xv - b.Get(i);
          break;
        case CUDNN_POINTWISE_MUL:
          v = xv * b.Get(i);
          break;
        case CUDNN_POINTWISE_DIV:
          v = xv / b.Get(i);
          break;
        case CUDNN_POINTWISE_EXP:
          v = std::exp(xv);
          break;
        case CUDNN_POINTWISE_LOG:
          v = std::log(xv);
          break;
        case CUDNN_POINTWISE_IDENTITY:
          v = xv;
          break;
        case CUDNN_POINTWISE_CMP_GE:
          v = xv >= b.Get(i) ? 1.0 : 0.0;
          break;
        case CUDNN_POINTWISE_BINARY_SELECT:
          v = t.Get(i) != 0.0f ? xv : b.Get(i);
          break;
        case CUDNN_POINTWISE_GEN_INDEX:
          v = static_cast<double>(i[op.axis]);
          break;
        default:
          std::fprintf(stderr, "emulated cuDNN: pointwise mode %d\n", op.mode);
          std::abort();
      }
      y.Put(y.Offset(i), v);
    });
  }

  // Whether an operand of batch extents `dims` serves output extents `out`: each equal, 1, or
  // dividing the output's (a KV head serving its group of query heads).
  static bool Serves(const std::vector<int64_t>& dims, const std::vector<int64_t>& out) {
    for (int d = 0; d < 2; ++d) {
      if (dims[d] > out[d] || out[d] % dims[d] != 0) return false;
    }
    return true;
  }
  // The index of an operand of extents `dims` that output index i reads in the batch dimensions.
  static Index Batch(const std::vector<int64_t>& dims, const std::vector<int64_t>& out,
                     const Index& i) {
    Index j = i;
    for (int d = 0; d < 2; ++d) j[d] = i[d] * dims[d] / out[d];
    return j;
  }

  void Matmul(const OpRecord& op) {
    const View c = Storage(op.y), a = Storage(op.x), b = Storage(op.b);
    const std::vector<int64_t>&cd = c.t->dims, &ad = a.t->dims, &bd = b.t->dims;
    const int64_t k = ad[3];
    if (bd[2] != k || ad[2] != cd[2] || bd[3] != cd[3]) Refuse("a matmul of mismatched shapes");
    if (!Serves(ad, cd) || !Serves(bd, cd)) {
      Refuse("a matmul operand's batch extents do not divide the output's");
    }
    const bool accumulator = c.t->kind == Kind::kAccumulator;
    Each(cd, [&](const Index& i) {
      Index ia = Batch(ad, cd, i), ib = Batch(bd, cd, i);
      ia[3] = 0;
      ib[2] = 0;
      const int64_t a0 = a.Offset(ia), b0 = b.Offset(ib);
      double s = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        s += static_cast<double>(a.At(a0 + kk * a.strides[3])) * b.At(b0 + kk * b.strides[2]);
      }
      c.Put(c.Offset(i), accumulator ? s + c.Get(i) : s);
    });
  }

  void Reduction(const OpRecord& op) {
    const View y = Storage(op.y), x = Storage(op.x);
    const std::vector<int64_t>&yd = y.t->dims, &xd = x.t->dims;
    for (int d = 0; d < 4; ++d) {
      if (yd[d] != 1 && (yd[d] > xd[d] || xd[d] % yd[d] != 0)) {
        Refuse("a reduction's output extent is neither 1 nor a divisor of its input's");
      }
    }
    const bool max = op.mode == CUDNN_REDUCE_TENSOR_MAX;
    std::vector<double> acc(Count(*y.t), max ? -std::numeric_limits<double>::infinity() : 0.0);
    Each(xd, [&](const Index& i) {
      Index j;
      for (int d = 0; d < 4; ++d) j[d] = yd[d] == 1 ? 0 : i[d] * yd[d] / xd[d];
      double& s = acc[((j[0] * yd[1] + j[1]) * yd[2] + j[2]) * yd[3] + j[3]];
      const double v = x.Get(i);
      s = max ? std::max(s, v) : s + v;
    });
    Each(yd, [&](const Index& j) {
      y.Put(y.Offset(j), acc[((j[0] * yd[1] + j[1]) * yd[2] + j[2]) * yd[3] + j[3]]);
    });
  }

  // y's logical element i is x's storage at y's strides.
  void Reshape(const OpRecord& op) {
    const View x = Storage(op.x);
    View y = Storage(op.y);
    const TensorRecord& yt = *y.t;
    if (Count(yt) != Count(*x.t)) Refuse("a reshape to another number of elements");
    if (x.t->kind == Kind::kVirtual && x.t->strides != Graph::Packed(x.t->dims)) {
      Refuse("a reshape of a virtual tensor that is not packed");
    }
    Each(yt.dims, [&](const Index& i) {
      const int64_t at =
          i[0] * yt.strides[0] + i[1] * yt.strides[1] + i[2] * yt.strides[2] + i[3] * yt.strides[3];
      y.Put(y.Offset(i), x.At(at));
    });
  }

  std::map<int64_t, TensorRecord> tensors_;
  std::map<int64_t, std::vector<float>> values_;
  std::map<int64_t, void*> io_;
  std::map<int64_t, float> scalars_;
};

}  // namespace

absl::Status Execute(cudnnHandle_t handle, const Plan& plan, const std::vector<int64_t>& uids,
                     const std::vector<void*>& pointers, void*) {
  if (uids.size() != pointers.size()) return absl::InvalidArgumentError("uids and pointers differ");
  const cudnnBackendDescriptor_st& g = *plan.graph.get();
  std::map<int64_t, void*> io;
  std::map<int64_t, float> scalars;  // read now, as cuDNN reads by-value tensors
  for (const TensorRecord& t : g.tensors) {
    if (t.kind == Kind::kVirtual) continue;
    size_t k = 0;
    while (k < uids.size() && uids[k] != t.uid) ++k;
    if (k == uids.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.uid, " has no pointer"));
    }
    if (t.kind == Kind::kByValue) {
      scalars[t.uid] = *static_cast<const float*>(pointers[k]);
    } else {
      if (!eellm_emu::IsDevice(pointers[k], 1)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", t.uid, " is not device memory"));
      }
      io[t.uid] = pointers[k];
    }
  }
  auto graph = std::make_shared<cudnnBackendDescriptor_st>(g);
  eellm_emu::Issue(handle->stream,
                   [graph, io, scalars] { Interpreter(*graph, io, scalars).Run(graph->ops); });
  return absl::OkStatus();
}

}  // namespace eellm::cuda::cudnn
