// cuDNN's fused flash attention for the training path (cudnn_attention.h): the forward and
// backward graphs, a plan per shape, and one workspace.
#include "engine/cuda/cudnn_attention.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#if EELLM_HAVE_CUDNN
#include <cudnn.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/logging.h"
#include "engine/cuda/cudnn_graph.h"
#endif

namespace eellm::cuda {

bool CudnnAttention::Offered(const AttentionShape& s) {
  return s.d % 8 == 0 && s.d >= 64 && s.d <= 128 && s.hkv > 0 && s.hq % s.hkv == 0 && s.t >= 2 &&
         s.b > 0;
}

#if EELLM_HAVE_CUDNN
namespace {

using cudnn::Graph;
using Kind = Graph::Kind;

// The tensors the variant packs name.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kScale,
  kMaskFill,
  kDout,
  kDq,
  kDk,
  kDv,
  kOne,
  kSoftmaxSum,
  kDqAccumulator
};

// The layouts, as 4-d [b, heads, t, d] views of the [b, t, heads, d] rows (`row` elements
// between tokens; dense: h d).
std::vector<int64_t> Rows(int b, int h, int t, int d) { return {b, h, t, d}; }
std::vector<int64_t> RowStrides(int h, int t, int d, int64_t row = 0) {
  if (row == 0) row = static_cast<int64_t>(h) * d;
  return {static_cast<int64_t>(t) * row, d, row, 1};
}
// k (or v) transposed, [b, h, d, t], by strides alone (rows `row` elements apart).
std::vector<int64_t> Transposed(int b, int h, int t, int d) { return {b, h, d, t}; }
std::vector<int64_t> TransposedStrides(int t, int d, int64_t row) {
  return {static_cast<int64_t>(t) * row, d, 1, row};
}
const std::vector<int64_t> kScalar = {1, 1, 1, 1};

// The scores scale q k^T (minus the stats where `minus_stats`: the backward's exponent), with
// the causally masked entries replaced by the by-value kMaskFill; returns their uid.
int64_t MaskedScores(Graph& g, const AttentionShape& s, bool minus_stats) {
  const std::vector<int64_t> scores = {s.b, s.hq, s.t, s.t};
  const int64_t qk = g.Virtual(scores);
  g.Matmul(qk, kQ, kK);
  int64_t x = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_MUL, x, qk, kScale);
  if (minus_stats) {
    const int64_t y = g.Virtual(scores);
    g.Pointwise(CUDNN_POINTWISE_SUB, y, x, kStats);
    x = y;
  }
  const int64_t row = g.Virtual(scores, CUDNN_DATA_INT32),
                col = g.Virtual(scores, CUDNN_DATA_INT32);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, row, x, 0, 0, 2);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, col, x, 0, 0, 3);
  const int64_t keep = g.Virtual(scores, CUDNN_DATA_BOOLEAN);
  g.Pointwise(CUDNN_POINTWISE_CMP_GE, keep, row, col, 0, -1, CUDNN_DATA_BOOLEAN);
  const int64_t masked = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_BINARY_SELECT, masked, x, kMaskFill, keep);
  return masked;
}

// The tensors both graphs read: q, k^T (at their row strides: the parts of one fused q, k, v
// buffer, or dense), the scale and the mask's fill value.
void Inputs(Graph& g, const AttentionShape& s) {
  g.Tensor(Rows(s.b, s.hq, s.t, s.d), RowStrides(s.hq, s.t, s.d, s.q_row()), CUDNN_DATA_BFLOAT16,
           Kind::kIo, kQ);
  g.Tensor(Transposed(s.b, s.hkv, s.t, s.d), TransposedStrides(s.t, s.d, s.kv_row()),
           CUDNN_DATA_BFLOAT16, Kind::kIo, kK);
  g.Tensor(kScalar, kScalar, CUDNN_DATA_FLOAT, Kind::kByValue, kScale);
  g.Tensor(kScalar, kScalar, CUDNN_DATA_FLOAT, Kind::kByValue, kMaskFill);
}

std::vector<int64_t> StatsDims(const AttentionShape& s) { return {s.b, s.hq, s.t, 1}; }

// Forward: P = softmax(masked scores), O = P V (P in bf16), stats = max + log(sum exp).
void ForwardGraph(Graph& g, const AttentionShape& s) {
  Inputs(g, s);
  g.Tensor(Rows(s.b, s.hkv, s.t, s.d), RowStrides(s.hkv, s.t, s.d, s.kv_row()), CUDNN_DATA_BFLOAT16,
           Kind::kIo, kV);
  g.Tensor(Rows(s.b, s.hq, s.t, s.d), RowStrides(s.hq, s.t, s.d), CUDNN_DATA_BFLOAT16, Kind::kIo,
           kO);
  g.Tensor(StatsDims(s), Graph::Packed(StatsDims(s)), CUDNN_DATA_FLOAT, Kind::kIo, kStats);
  const std::vector<int64_t> scores = {s.b, s.hq, s.t, s.t};
  const int64_t masked = MaskedScores(g, s, false);
  const int64_t mx = g.Virtual(StatsDims(s)), shifted = g.Virtual(scores), e = g.Virtual(scores);
  g.Reduction(CUDNN_REDUCE_TENSOR_MAX, mx, masked);
  g.Pointwise(CUDNN_POINTWISE_SUB, shifted, masked, mx);
  g.Pointwise(CUDNN_POINTWISE_EXP, e, shifted);
  const int64_t sum = g.Virtual(StatsDims(s)), log_sum = g.Virtual(StatsDims(s));
  g.Reduction(CUDNN_REDUCE_TENSOR_ADD, sum, e);
  g.Pointwise(CUDNN_POINTWISE_LOG, log_sum, sum);
  g.Pointwise(CUDNN_POINTWISE_ADD, kStats, mx, log_sum);
  const int64_t p = g.Virtual(scores, CUDNN_DATA_BFLOAT16);
  g.Pointwise(CUDNN_POINTWISE_DIV, p, e, sum);
  g.Matmul(kO, p, kV);
}

// dst = a b, or with GQA a b per query head (bf16) summed over each KV head's group.
void MatmulIntoKvHeads(Graph& g, const AttentionShape& s, int64_t dst, int64_t a, int64_t b) {
  if (s.hq == s.hkv) {
    g.Matmul(dst, a, b);
    return;
  }
  const int64_t full = g.Virtual(Rows(s.b, s.hq, s.t, s.d), CUDNN_DATA_BFLOAT16);
  g.Matmul(full, a, b);
  g.Reduction(CUDNN_REDUCE_TENSOR_ADD, dst, full);
}

// Backward: P from the stats; dV = P^T dO; dS = scale P (dO V^T - rowsum(dO * O));
// dK = dS^T Q; dQ = dS K, written by its matmul (deterministic) or, `accumulating`, summed in an
// fp32 accumulator in the workspace (atomics) and then converted.
void BackwardGraph(Graph& g, const AttentionShape& s, bool accumulating) {
  Inputs(g, s);
  g.Tensor(Transposed(s.b, s.hkv, s.t, s.d), TransposedStrides(s.t, s.d, s.kv_row()),
           CUDNN_DATA_BFLOAT16, Kind::kIo, kV);  // v^T
  const auto q_rows = Rows(s.b, s.hq, s.t, s.d), q_strides = RowStrides(s.hq, s.t, s.d);
  const auto kv_rows = Rows(s.b, s.hkv, s.t, s.d);
  g.Tensor(q_rows, q_strides, CUDNN_DATA_BFLOAT16, Kind::kIo, kO);
  g.Tensor(q_rows, q_strides, CUDNN_DATA_BFLOAT16, Kind::kIo, kDout);
  // The gradients in q, k and v's layout.
  g.Tensor(q_rows, RowStrides(s.hq, s.t, s.d, s.q_row()), CUDNN_DATA_BFLOAT16, Kind::kIo, kDq);
  const auto kv_strides = RowStrides(s.hkv, s.t, s.d, s.kv_row());
  g.Tensor(kv_rows, kv_strides, CUDNN_DATA_BFLOAT16, Kind::kIo, kDk);
  g.Tensor(kv_rows, kv_strides, CUDNN_DATA_BFLOAT16, Kind::kIo, kDv);
  g.Tensor(StatsDims(s), Graph::Packed(StatsDims(s)), CUDNN_DATA_FLOAT, Kind::kIo, kStats);
  g.Tensor(StatsDims(s), Graph::Packed(StatsDims(s)), CUDNN_DATA_FLOAT, Kind::kIo, kSoftmaxSum);
  g.Tensor(kScalar, kScalar, CUDNN_DATA_FLOAT, Kind::kByValue, kOne);
  // rowsum(dO * O), into the workspace's first bytes.
  const int64_t dout_out = g.Virtual(q_rows), row_sum = g.Virtual(StatsDims(s));
  g.Pointwise(CUDNN_POINTWISE_MUL, dout_out, kDout, kO);
  g.Reduction(CUDNN_REDUCE_TENSOR_ADD, row_sum, dout_out);
  g.Pointwise(CUDNN_POINTWISE_MUL, kSoftmaxSum, row_sum, kOne);
  // P = exp(masked scores - stats); its transpose in bf16 for dV.
  const std::vector<int64_t> scores = {s.b, s.hq, s.t, s.t};
  const std::vector<int64_t> transposed_scores = {static_cast<int64_t>(s.hq) * s.t * s.t,
                                                  static_cast<int64_t>(s.t) * s.t, 1, s.t};
  const int64_t p = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_EXP, p, MaskedScores(g, s, true));
  const int64_t p_t = g.Tensor(scores, transposed_scores, CUDNN_DATA_BFLOAT16, Kind::kVirtual);
  g.Reshape(p_t, p);
  MatmulIntoKvHeads(g, s, kDv, p_t, kDout);
  // dS = scale P (dP - rowsum), dP = dO V^T.
  const int64_t dp = g.Virtual(scores), centred = g.Virtual(scores), pdp = g.Virtual(scores),
                ds = g.Virtual(scores);
  g.Matmul(dp, kDout, kV);
  g.Pointwise(CUDNN_POINTWISE_SUB, centred, dp, kSoftmaxSum);
  g.Pointwise(CUDNN_POINTWISE_MUL, pdp, centred, p);
  g.Pointwise(CUDNN_POINTWISE_MUL, ds, pdp, kScale);
  const int64_t ds_t = g.Tensor(scores, transposed_scores, CUDNN_DATA_BFLOAT16, Kind::kVirtual);
  g.Reshape(ds_t, ds);
  MatmulIntoKvHeads(g, s, kDk, ds_t, kQ);
  // K's rows as they lie (the transpose of kK's view, at the rows' stride).
  const int64_t k = g.Tensor(kv_rows, kv_strides, CUDNN_DATA_FLOAT, Kind::kVirtual);
  g.Reshape(k, kK);
  if (!accumulating) {
    g.Matmul(kDq, ds, k);
    return;
  }
  g.Tensor(q_rows, Graph::Packed(q_rows), CUDNN_DATA_FLOAT, Kind::kAccumulator, kDqAccumulator);
  g.Matmul(kDqAccumulator, ds, k);
  g.Pointwise(CUDNN_POINTWISE_IDENTITY, kDq, kDqAccumulator);
}

using Pass = CudnnAttention::Pass;
void BuildGraph(Graph& g, const AttentionShape& s, Pass pass) {
  if (pass == Pass::kForward) {
    ForwardGraph(g, s);
  } else {
    BackwardGraph(g, s, pass == Pass::kBackwardAccumulatingDq);
  }
}
const char* PassName(Pass pass) {
  return pass == Pass::kForward    ? "forward"
         : pass == Pass::kBackward ? "backward"
                                   : "backward (fp32 dQ accumulator, not deterministic)";
}
// What the log lines name: "cuDNN attention <pass> (<shape>)".
std::string Describe(const AttentionShape& s, Pass pass) {
  const bool strided = s.q_row() != s.hq * s.d || s.kv_row() != s.hkv * s.d;
  return absl::StrFormat("cuDNN attention %s (b %d, t %d, heads %d/%d, d %d%s)", PassName(pass),
                         s.b, s.t, s.hq, s.hkv, s.d,
                         strided ? absl::StrFormat(", rows %d/%d", s.q_row(), s.kv_row()) : "");
}

constexpr size_t kAlign = 256;
size_t Aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

}  // namespace

struct CudnnAttention::Impl {
  cudaStream_t stream = nullptr;
  cudnnHandle_t handle = nullptr;
  bool broken = false;               // the handle could not be made: every call returns false
  bool allow_accumulating = false;   // EELLM_CUDNN_ATTENTION=any (or accumulating)
  bool prefer_accumulating = false;  // EELLM_CUDNN_ATTENTION=accumulating
  struct Entry {
    bool ok = false;
    Pass pass = Pass::kForward;  // the graph the plan runs
    cudnn::Plan plan;
  };
  std::map<std::pair<AttentionShape, bool>, Entry> plans;  // (shape, backward)
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  size_t workspace_cap = 0;  // the most the workspace may take (set with the handle)

  ~Impl() {
    plans.clear();  // (before the handle they were built with)
    if (workspace != nullptr) cudaFree(workspace);
    if (handle != nullptr) cudnnDestroy(handle);
  }

  // The plan of (s, backward), built at the first call; null where cuDNN has none.
  const Entry* PlanFor(const AttentionShape& s, bool backward) {
    if (broken) return nullptr;
    if (handle == nullptr) {
      cudnnStatus_t st = cudnnCreate(&handle);
      if (st == CUDNN_STATUS_SUCCESS) st = cudnnSetStream(handle, stream);
      if (st != CUDNN_STATUS_SUCCESS) {
        LogInfo("cuDNN attention: no handle (%s); attention runs on the fused kernels",
                cudnnGetErrorString(st));
        broken = true;
        return nullptr;
      }
      size_t free_bytes = 0, total_bytes = 0;
      if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) cudaGetLastError();
      // A workspace that grows as t^2 (the deterministic backward's) could otherwise take the
      // memory the step's own buffers need later.
      workspace_cap = std::max<size_t>(size_t{256} << 20, total_bytes / 16);
      LogInfo("cuDNN attention: cuDNN %zu, workspace at most %.0f MiB", cudnnGetVersion(),
              workspace_cap / 1048576.0);
    }
    auto [it, inserted] = plans.try_emplace({s, backward});
    Entry& e = it->second;
    if (!inserted) return e.ok ? &e : nullptr;
    e.pass = !backward             ? Pass::kForward
             : prefer_accumulating ? Pass::kBackwardAccumulatingDq
                                   : Pass::kBackward;
    if (backward && cudnnGetVersion() <= 91500 && s.t % 128 != 0) {
      // cuDNN up to 9.15 needs a padding mask in the backward where the keys are not whole
      // tiles of 128 (cudnn-frontend adds one as a workaround); these graphs have none.
      LogInfo("%s: not offered with cuDNN %zu where t %% 128 != 0; the fused kernels run it",
              Describe(s, e.pass), cudnnGetVersion());
      return nullptr;
    }
    // With =any or =accumulating the other backward is tried where the first has no plan.
    absl::StatusOr<cudnn::Plan> plan = Build(s, e.pass, backward && allow_accumulating);
    if (e.pass == Pass::kBackward && allow_accumulating &&
        (!plan.ok() || Need(s, e.pass, *plan) > workspace_cap)) {
      if (plan.ok()) {
        LogInfo("%s: its workspace of %.1f MiB is over the cap", Describe(s, e.pass),
                Need(s, e.pass, *plan) / 1048576.0);
      }
      e.pass = Pass::kBackwardAccumulatingDq;
      plan = Build(s, e.pass, false);
    } else if (e.pass == Pass::kBackwardAccumulatingDq && !plan.ok()) {
      e.pass = Pass::kBackward;  // (=accumulating, where cuDNN has no plan for that one)
      plan = Build(s, e.pass, false);
    }
    if (!plan.ok()) return nullptr;
    const std::string what = Describe(s, e.pass);
    const size_t need = Need(s, e.pass, *plan);
    if (need > workspace_cap) {
      LogInfo(
          "%s: its workspace of %.1f MiB is over the %.1f MiB cuDNN attention may take (1/16 of "
          "the GPU's memory)%s; the fused kernels run it",
          what, need / 1048576.0, workspace_cap / 1048576.0,
          e.pass == Pass::kBackward && !allow_accumulating
              ? " (EELLM_CUDNN_ATTENTION=any allows the accumulating one)"
              : "");
      return nullptr;
    }
    if (need > workspace_bytes) {  // (the old one stays for the other plans until this fits)
      void* grown = nullptr;
      if (cudaMalloc(&grown, need) != cudaSuccess) {
        cudaGetLastError();  // (clears the allocation error)
        LogInfo("%s: its workspace of %.1f MiB does not fit; the fused kernels run it", what,
                need / 1048576.0);
        return nullptr;
      }
      if (workspace != nullptr) cudaFree(workspace);  // (synchronises)
      workspace = grown;
      workspace_bytes = need;
    }
    e.plan = std::move(*plan);
    e.ok = true;
    LogInfo("%s: %s, workspace %.1f MiB", what, e.plan.engine, need / 1048576.0);
    return &e;
  }

  // The plan of `pass` for s, or the refusal (said once on stderr; `other_follows`: the other
  // backward is tried next).
  absl::StatusOr<cudnn::Plan> Build(const AttentionShape& s, Pass pass, bool other_follows) {
    Graph g(handle);
    BuildGraph(g, s, pass);
    absl::StatusOr<cudnn::Plan> plan = g.Build();
    if (!plan.ok()) {
      // (cuDNN leaves out of the heuristics' results the engines it cannot run, e.g. for want of
      // NVRTC, which its attention engines compile with: its log says why.)
      LogInfo(
          "%s: not available (%s)%s; cuDNN's reasons: CUDNN_LOGLEVEL_DBG=2 "
          "CUDNN_LOGDEST_DBG=stderr (its attention engines need libnvrtc on the loader path)",
          Describe(s, pass), std::string(plan.status().message()),
          other_follows ? "; the other backward is tried" : "; the fused kernels run it");
    }
    return plan;
  }

  // The workspace bytes before the plan's own: the backward's rowsum(dO * O), then the fp32 dQ
  // accumulator where the pass has one.
  static size_t SoftmaxSumBytes(const AttentionShape& s) {
    return Aligned(sizeof(float) * s.b * s.hq * s.t);
  }
  static size_t Extra(const AttentionShape& s, Pass pass) {
    if (pass == Pass::kForward) return 0;
    const size_t accumulator =
        pass == Pass::kBackwardAccumulatingDq ? Aligned(sizeof(float) * s.b * s.hq * s.t * s.d) : 0;
    return SoftmaxSumBytes(s) + accumulator;
  }
  // The workspace bytes a pass's plan runs with.
  static size_t Need(const AttentionShape& s, Pass pass, const cudnn::Plan& plan) {
    return Extra(s, pass) + static_cast<size_t>(std::max<int64_t>(plan.workspace, 0));
  }

  // Runs the plan of (s, backward); false (the shape given up, said once) when cuDNN refuses to
  // execute it: the caller's kernels then write every output.
  bool Run(const AttentionShape& s, bool backward, std::vector<int64_t> uids,
           std::vector<void*> pointers) {
    Entry& e = plans.at({s, backward});
    const cudnn::Plan& plan = e.plan;
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    if (backward) {
      uids.push_back(kSoftmaxSum);
      pointers.push_back(ws);
    }
    if (e.pass == Pass::kBackwardAccumulatingDq) {
      // Zeroed here: cuDNN (>= 9.6) zeroes the accumulator the frontend reserves for it, but
      // this one is ours, and an uncleared one would add every call's dQ to the last's.
      unsigned char* accumulator = ws + SoftmaxSumBytes(s);
      cudaMemsetAsync(accumulator, 0, Extra(s, e.pass) - SoftmaxSumBytes(s), stream);
      uids.push_back(kDqAccumulator);
      pointers.push_back(accumulator);
    }
    const absl::Status st = cudnn::Execute(handle, plan, uids, pointers,
                                           plan.workspace > 0 ? ws + Extra(s, e.pass) : nullptr);
    if (!st.ok()) {
      cudaGetLastError();  // (a launch error cuDNN left would fail the fused kernels' launch)
      LogError("%s: %s; the fused kernels run it", Describe(s, e.pass), std::string(st.message()));
      e.ok = false;
    }
    return st.ok();
  }
};

CudnnAttention::CudnnAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnAttention::~CudnnAttention() = default;

absl::Status CudnnAttention::CheckGraph(const AttentionShape& s, Pass pass) {
  Graph g(nullptr);
  BuildGraph(g, s, pass);
  return g.status();
}

absl::StatusOr<CudnnAttention::PlanInfo> CudnnAttention::PlanFor(const AttentionShape& s, Pass pass,
                                                                 const std::string& device_json) {
  absl::StatusOr<cudnn::Descriptor> device = cudnn::DeviceProperties(device_json);
  if (!device.ok()) return device.status();
  Graph g(nullptr, device->get());
  BuildGraph(g, s, pass);
  absl::StatusOr<cudnn::Plan> plan = g.Build();
  if (!plan.ok()) return plan.status();
  const int64_t workspace =
      plan->workspace < 0 ? -1 : static_cast<int64_t>(Impl::Extra(s, pass)) + plan->workspace;
  return PlanInfo{plan->engine, workspace};
}

absl::StatusOr<std::string> CudnnAttention::DeviceJson() {
  cudnnHandle_t handle = nullptr;
  const cudnnStatus_t s = cudnnCreate(&handle);
  if (s != CUDNN_STATUS_SUCCESS) {
    return absl::UnavailableError(absl::StrCat("no cuDNN handle: ", cudnnGetErrorString(s)));
  }
  absl::StatusOr<std::string> json = cudnn::DevicePropertiesJson(handle);
  cudnnDestroy(handle);
  return json;
}

std::unique_ptr<CudnnAttention> CudnnAttention::Create(cudaStream_t stream) {
  const char* env = std::getenv("EELLM_CUDNN_ATTENTION");
  if (env != nullptr && std::strcmp(env, "0") == 0) return nullptr;
  auto impl = std::make_unique<Impl>();
  impl->stream = stream;
  impl->prefer_accumulating = env != nullptr && std::strcmp(env, "accumulating") == 0;
  impl->allow_accumulating =
      impl->prefer_accumulating || (env != nullptr && std::strcmp(env, "any") == 0);
  return std::unique_ptr<CudnnAttention>(new CudnnAttention(std::move(impl)));
}

bool CudnnAttention::Forward(void* out, float* lse, const void* q, const void* k, const void* v,
                             const AttentionShape& s) {
  if (!Offered(s) || impl_->PlanFor(s, false) == nullptr) return false;
  float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
  float fill = -std::numeric_limits<float>::infinity();
  return impl_->Run(
      s, false, {kQ, kK, kV, kO, kStats, kScale, kMaskFill},
      {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out, lse, &scale, &fill});
}

bool CudnnAttention::Backward(void* dq, void* dk, void* dv, const void* dout, const void* out,
                              const float* lse, const void* q, const void* k, const void* v,
                              const AttentionShape& s) {
  if (!Offered(s) || impl_->PlanFor(s, true) == nullptr) return false;
  float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
  float fill = std::numeric_limits<float>::lowest();
  float one = 1.0f;
  return impl_->Run(
      s, true, {kQ, kK, kV, kO, kStats, kScale, kMaskFill, kDout, kDq, kDk, kDv, kOne},
      {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), const_cast<void*>(out),
       const_cast<float*>(lse), &scale, &fill, const_cast<void*>(dout), dq, dk, dv, &one});
}

#else  // no cuDNN in this build

struct CudnnAttention::Impl {};
CudnnAttention::CudnnAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnAttention::~CudnnAttention() = default;
std::unique_ptr<CudnnAttention> CudnnAttention::Create(cudaStream_t) { return nullptr; }
absl::Status CudnnAttention::CheckGraph(const AttentionShape&, Pass) {
  return absl::UnimplementedError("this build has no cuDNN");
}
absl::StatusOr<CudnnAttention::PlanInfo> CudnnAttention::PlanFor(const AttentionShape&, Pass,
                                                                 const std::string&) {
  return absl::UnimplementedError("this build has no cuDNN");
}
absl::StatusOr<std::string> CudnnAttention::DeviceJson() {
  return absl::UnimplementedError("this build has no cuDNN");
}
bool CudnnAttention::Forward(void*, float*, const void*, const void*, const void*,
                             const AttentionShape&) {
  return false;
}
bool CudnnAttention::Backward(void*, void*, void*, const void*, const void*, const float*,
                              const void*, const void*, const void*, const AttentionShape&) {
  return false;
}

#endif

}  // namespace eellm::cuda
