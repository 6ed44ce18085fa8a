// LtGemm: bf16 x bf16 GEMMs with fp32 accumulation through cuBLASLt, for what cublasGemmEx
// cannot fuse: the bias add of a Linear forward (epilogue BIAS: added before D's one rounding,
// so a bf16 output is rounded once), the bias gradient of its backward (epilogue BGRADB:
// op(B)'s column sums over k, computed by the weight-gradient GEMM from the operand it already
// reads), and the GELU of a GELU MLP (GELU_AUX(_BIAS): D = gelu(product + bias) with the GELU's
// input written beside it; DGELU: D = product * gelu'(input), the input read). Column-major like
// cuBLAS. A bf16 D is rounded once: where cuBLASLt splits k, its partial sums stay fp32 (the
// plans allow only that reduction scheme for a bf16 D). Each distinct problem's descriptors and the
// algorithm the heuristic picks are built once and cached (a training step repeats a few dozen
// shapes); a problem cuBLASLt has no algorithm for is remembered as such and Run returns false, so
// that the caller can take its cublasGemmEx path. With `tune` (EELLM_GEMM_TUNE=1 on the backend),
// a problem's first run times up to kTuneCandidates of the heuristic's algorithms on it and keeps
// the fastest (PyTorch's TunableOp does the same for its GEMMs): the choice rests on timings, so
// runs may differ in their last bits where another algorithm wins.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace eellm::cuda {

class LtGemm {
 public:
  // D = alpha op(A) op(B) + beta C, D m x n; A, B bf16 (m x k and k x n after their ops).
  struct Problem {
    cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
    int m = 0, n = 0, k = 0;
    float alpha = 1.0f, beta = 0.0f;
    const void* a = nullptr;
    int lda = 0;
    const void* b = nullptr;
    int ldb = 0;
    void* d = nullptr;
    int ldd = 0;
    bool d_bf16 = false;
    const void* c = nullptr;     // what beta scales: D's layout and dtype; null: D itself
    const void* bias = nullptr;  // [m] in D's dtype, added to every column (or null)
    float* bias_grad = nullptr;  // [n], written: sum over k of op(B) (or null; needs fp32 D)
    // kGelu: D = gelu(alpha op(A) op(B) + bias), aux = its input (written); kGeluBackward:
    // D = alpha op(A) op(B) * gelu'(aux) (aux read). aux has D's shape and dtype, leading
    // dimension aux_ld (a multiple of 8); beta must be 0.
    enum class Activation { kNone, kGelu, kGeluBackward };
    Activation activation = Activation::kNone;
    void* aux = nullptr;
    int aux_ld = 0;
  };

  // cuBLAS's recommended workspace on Hopper (32 MiB): enough for its split-K and stream-K
  // kernels.
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;

  // Algorithms timed per problem when tuning.
  static constexpr int kTuneCandidates = 8;

  // `workspace`: kWorkspaceBytes of device memory the GEMMs use in `stream`'s order (the backend
  // shares it with its cuBLAS handle on the same stream); not owned. `tune`: see above.
  LtGemm(cudaStream_t stream, void* workspace, bool tune = false);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Runs p and returns true, or returns false (nothing run) when cuBLASLt has no algorithm for
  // it. Aborts on a failed launch.
  bool Run(const Problem& p);

 private:
  // The problem without its pointers, plus their alignments (the heuristic's choice depends on
  // them).
  using Key = std::array<int64_t, 20>;
  struct Plan {
    bool ok = false;   // the heuristic found an algorithm (and its first launch took it)
    bool ran = false;  // launched successfully at least once
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo = {};
    std::vector<cublasLtMatmulAlgo_t> candidates;  // tuning: the heuristic's, best first
  };
  Plan& PlanFor(const Problem& p, const Key& key);
  // Times plan.candidates on p, with D in scratch (the caller's D, and a C it accumulates into,
  // are left as they are), keeps the fastest in plan.algo and clears the candidates.
  void Tune(Plan& plan, const Problem& p);
  void Clear();  // destroys every plan

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;  // kWorkspaceBytes, not owned
  bool tune_ = false;
  std::map<Key, Plan> plans_;
};

}  // namespace eellm::cuda
