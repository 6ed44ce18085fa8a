// The arithmetic of cuDNN's attention graphs (engine/cuda/cudnn_attention.cc) written out
// directly, with every rounding where the graphs' tensor types put one: each virtual tensor of
// the graph is an fp32 value, P (and P^T, dS^T) bf16, the outputs bf16; products and reductions
// summed in double, as the CPU emulation's interpreter of those graphs does
// (tests/gpu/emu/emulated_cudnn_graph.cc). Bf16ReferenceBackend runs it for a whole training
// step where the device under the emulation runs the graphs, so that such a step can be held to
// the same order-only bound as one on the fused kernels. Values dense [b, t, heads, d]; causal,
// t queries over the same t keys; query head h reads KV head h / (hq / hkv).
#pragma once

namespace eellm::testing {

// out (the values before their bf16 store: the caller rounds them) and lse [b, hq, t] (fp32).
void CudnnGraphAttentionForward(float* out, float* lse, const float* q, const float* k,
                                const float* v, int b, int t, int hq, int hkv, int d);

// dq, dk, dv before their bf16 store, from dout, out and the forward's lse; dk and dv each query
// head's bf16 product summed over the KV head's group.
void CudnnGraphAttentionBackward(float* dq, float* dk, float* dv, const float* dout,
                                 const float* out, const float* lse, const float* q, const float* k,
                                 const float* v, int b, int t, int hq, int hkv, int d);

}  // namespace eellm::testing
