// LtGemm: cached cuBLASLt plans and their launch (see lt_gemm.h).
#include "engine/cuda/lt_gemm.h"

#include <cstdio>
#include <utility>

#include "engine/core/status.h"
#include "engine/cuda/cuda_check.h"

namespace eellm::cuda {
namespace {

// Plans kept at most; beyond it the cache starts again (a training step uses a few dozen).
constexpr size_t kMaxPlans = 4096;

// The largest power of two (up to 256) that divides the address; 256 for null.
int64_t Alignment(const void* p) {
  const auto u = reinterpret_cast<uintptr_t>(p);
  int64_t a = 1;
  while (a < 256 && u % (2 * a) == 0) a *= 2;
  return a;
}

// The epilogue a problem asks for, and the vector it reads or writes.
uint32_t EpilogueOf(const LtGemm::Problem& p) {
  using Activation = LtGemm::Problem::Activation;
  if (p.activation == Activation::kGelu) {
    return p.bias != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  }
  if (p.activation == Activation::kGeluBackward) return CUBLASLT_EPILOGUE_DGELU;
  return p.bias != nullptr        ? CUBLASLT_EPILOGUE_BIAS
         : p.bias_grad != nullptr ? CUBLASLT_EPILOGUE_BGRADB
                                  : CUBLASLT_EPILOGUE_DEFAULT;
}

// Sets the pointers a launch reads: the bias vector and the GELU's input matrix.
void SetPointers(cublasLtMatmulDesc_t desc, const LtGemm::Problem& p, const void* vector) {
  if (vector != nullptr) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector,
                                                sizeof(vector)));
  }
  if (p.aux != nullptr) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                &p.aux, sizeof(p.aux)));
  }
}
const void* VectorOf(const LtGemm::Problem& p) { return p.bias != nullptr ? p.bias : p.bias_grad; }

}  // namespace

LtGemm::LtGemm(cudaStream_t stream, void* workspace, bool tune)
    : stream_(stream), workspace_(workspace), tune_(tune) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
}

void LtGemm::Clear() {
  for (auto& [key, plan] : plans_) {
    if (plan.desc != nullptr) cublasLtMatmulDescDestroy(plan.desc);
    for (cublasLtMatrixLayout_t l : {plan.a, plan.b, plan.d}) {
      if (l != nullptr) cublasLtMatrixLayoutDestroy(l);
    }
  }
  plans_.clear();
}

LtGemm::~LtGemm() {
  Clear();
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

LtGemm::Plan& LtGemm::PlanFor(const Problem& p, const Key& key) {
  auto found = plans_.find(key);
  if (found != plans_.end()) return found->second;
  if (plans_.size() >= kMaxPlans) Clear();  // token counts that vary without end (serving)
  Plan& plan = plans_[key];
  const int32_t op_a = p.op_a, op_b = p.op_b;
  const uint32_t epilogue = EpilogueOf(p);
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                              sizeof(epilogue)));
  // The heuristic reads the pointers' alignments (Run sets the pointers at every call).
  SetPointers(plan.desc, p, VectorOf(p));
  if (p.aux != nullptr) {
    const int64_t aux_ld = p.aux_ld;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                &aux_ld, sizeof(aux_ld)));
  }
  const bool ta = p.op_a != CUBLAS_OP_N, tb = p.op_b != CUBLAS_OP_N;
  CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, ta ? p.k : p.m, ta ? p.m : p.k, p.lda));
  CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, tb ? p.n : p.k, tb ? p.k : p.n, p.ldb));
  CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&plan.d, p.d_bf16 ? CUDA_R_16BF : CUDA_R_32F, p.m, p.n, p.ldd));
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace = kWorkspaceBytes;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace, sizeof(workspace)));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const void*> aligned[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.c != nullptr ? p.c : p.d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.d}};
  for (const auto& [attr, ptr] : aligned) {
    const uint32_t bytes = static_cast<uint32_t>(Alignment(ptr));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof(bytes)));
  }
  if (p.d_bf16) {
    // A split-K reduction "in place" or in the output type would round a bf16 D more than once:
    // only partial sums in fp32 (or none).
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes)));
  }
  cublasLtMatmulHeuristicResult_t results[kTuneCandidates] = {};
  int returned = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.a, plan.b, plan.d, plan.d, pref,
                                     tune_ ? kTuneCandidates : 1, results, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status == CUBLAS_STATUS_SUCCESS) {
    for (int i = 0; i < returned; ++i) {
      if (results[i].state == CUBLAS_STATUS_SUCCESS) plan.candidates.push_back(results[i].algo);
    }
  }
  plan.ok = !plan.candidates.empty();
  if (plan.ok) {
    plan.algo = plan.candidates[0];
    if (plan.candidates.size() == 1) plan.candidates.clear();  // nothing to choose
  } else {
    std::fprintf(stderr,
                 "eellm: cuBLASLt has no algorithm for a %dx%dx%d GEMM (op %d/%d, epilogue %u, "
                 "status %d): cublasGemmEx and separate bias/GELU kernels instead\n",
                 p.m, p.n, p.k, op_a, op_b, epilogue, static_cast<int>(status));
  }
  return plan;
}

bool LtGemm::Run(const Problem& p) {
  EE_CHECK(p.bias == nullptr || p.bias_grad == nullptr, "a GEMM with both bias epilogues");
  EE_CHECK(p.bias_grad == nullptr || !p.d_bf16, "a bias gradient needs an fp32 D");
  EE_CHECK((p.activation == Problem::Activation::kNone) == (p.aux == nullptr),
           "a GELU epilogue needs its input matrix (aux), and only it");
  EE_CHECK(p.aux == nullptr ||
               (p.beta == 0.0f && p.bias_grad == nullptr && p.aux_ld % 8 == 0 && p.aux_ld >= p.m),
           "a GELU epilogue with beta != 0, a bias gradient, or an aux leading dimension (",
           p.aux_ld, ") that is not a multiple of 8 of at least ", p.m);
  EE_CHECK(p.activation != Problem::Activation::kGeluBackward || p.bias == nullptr,
           "a GELU backward epilogue with a bias");
  const Key key = {p.op_a,
                   p.op_b,
                   p.m,
                   p.n,
                   p.k,
                   p.lda,
                   p.ldb,
                   p.ldd,
                   p.d_bf16,
                   EpilogueOf(p),
                   p.beta != 0,
                   Alignment(p.a),
                   Alignment(p.b),
                   Alignment(p.d),
                   Alignment(p.bias),
                   Alignment(p.bias_grad),
                   Alignment(p.c),
                   static_cast<int64_t>(p.activation),
                   p.aux_ld,
                   Alignment(p.aux)};
  Plan& plan = PlanFor(p, key);
  if (!plan.ok) return false;
  if (!plan.candidates.empty()) Tune(plan, p);
  SetPointers(plan.desc, p, VectorOf(p));
  const void* c = p.c != nullptr ? p.c : p.d;
  const cublasStatus_t status =
      cublasLtMatmul(handle_, plan.desc, &p.alpha, p.a, plan.a, p.b, plan.b, &p.beta, c, plan.d,
                     p.d, plan.d, &plan.algo, workspace_, kWorkspaceBytes, stream_);
  if (status != CUBLAS_STATUS_SUCCESS && !plan.ran) {
    // Refused at its first launch (nothing ran): as if the heuristic had found nothing.
    cudaGetLastError();  // (a failed launch's error, which the next kernel would report)
    std::fprintf(stderr,
                 "eellm: cuBLASLt refused its algorithm for a %dx%dx%d GEMM (epilogue %u, status "
                 "%d): cublasGemmEx and separate bias/GELU kernels instead\n",
                 p.m, p.n, p.k, EpilogueOf(p), static_cast<int>(status));
    plan.ok = false;
    return false;
  }
  EE_CHECK(status == CUBLAS_STATUS_SUCCESS, "cublasLtMatmul failed: cuBLAS status ",
           static_cast<int>(status));
  plan.ran = true;
  return true;
}

void LtGemm::Tune(Plan& plan, const Problem& p) {
  // D (column-major m x n, leading dimension ldd) in scratch; C is the caller's (its D where the
  // problem accumulates into D), only read. A GELU's input matrix and a bias gradient are
  // written with the values the real run writes again.
  const size_t d_bytes = static_cast<size_t>(p.ldd) * (p.n - 1) * (p.d_bf16 ? 2 : 4) +
                         static_cast<size_t>(p.m) * (p.d_bf16 ? 2 : 4);
  void* scratch = nullptr;
  CUDA_CHECK(cudaMallocAsync(&scratch, d_bytes, stream_));
  Problem q = p;
  q.c = p.c != nullptr ? p.c : p.d;
  q.d = scratch;
  SetPointers(plan.desc, q, VectorOf(q));
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kRuns = 3;  // timed, after one untimed
  auto launch = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(handle_, plan.desc, &q.alpha, q.a, plan.a, q.b, plan.b, &q.beta, q.c,
                          plan.d, q.d, plan.d, &algo, workspace_, kWorkspaceBytes, stream_);
  };
  float best_ms = -1, first_ms = -1;
  int best = -1;
  for (size_t i = 0; i < plan.candidates.size(); ++i) {
    if (launch(plan.candidates[i]) != CUBLAS_STATUS_SUCCESS) {  // refused: not a choice
      cudaGetLastError();  // (a failed launch's error, which the next kernel would report)
      continue;
    }
    CUDA_CHECK(cudaEventRecord(start, stream_));
    bool ok = true;
    for (int r = 0; r < kRuns && ok; ++r) ok = launch(plan.candidates[i]) == CUBLAS_STATUS_SUCCESS;
    CUDA_CHECK(cudaEventRecord(stop, stream_));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (!ok) continue;
    if (i == 0) first_ms = ms / kRuns;
    if (best < 0 || ms / kRuns < best_ms) {
      best = static_cast<int>(i);
      best_ms = ms / kRuns;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  CUDA_CHECK(cudaFreeAsync(scratch, stream_));
  if (best >= 0) plan.algo = plan.candidates[best];
  std::fprintf(stderr,
               "eellm: cuBLASLt tuning of a %dx%dx%d GEMM (epilogue %u): %zu algorithms, kept #%d "
               "at %.4f ms (the heuristic's first: %.4f ms)\n",
               p.m, p.n, p.k, EpilogueOf(p), plan.candidates.size(), best, best_ms, first_ms);
  plan.candidates.clear();
}

}  // namespace eellm::cuda
