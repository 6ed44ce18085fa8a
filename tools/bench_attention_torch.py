#!/usr/bin/env python3
"""PyTorch's causal scaled-dot-product attention alone, at one model's attention shape: what a
FlashAttention-class kernel reaches on this GPU, beside the AttentionForward / AttentionBackward
lines of `eellm bench train`'s per-op table (same shapes, same FLOP convention).

FLOPs as eellm's profiler counts them (engine/profiling_backend.cc): forward 4 * d * b * hq *
t (t + 1) / 2 (the causal half of QK^T and PV), backward 2.5 times that. Inputs are random bf16
[b, hq, t, d] queries and [b, hkv, t, d] keys and values, through bench_torch.py's own attention
(the model reference's, GQA included) and config reading; each time is the median of --reps
CUDA-event timings after --warmup runs.

usage: bench_attention_torch.py --model configs/bench/llama_1p3b.json [--batch 4] [--seq 2048]
"""
import argparse
import json
import statistics

import torch

from bench_torch import attention, load_config


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=0, help="0: the model's max_seq_len")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_torch.py: needs a CUDA GPU")
    c = load_config(a.model)
    hq, hkv = c["num_heads"], c["num_kv_heads"]
    d = c.get("head_dim") or c["hidden_size"] // hq
    t = a.seq or c["max_seq_len"]
    b = a.batch
    g = torch.Generator(device="cuda").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q = rand(b, hq, t, d).requires_grad_()
    k = rand(b, hkv, t, d).requires_grad_()
    v = rand(b, hkv, t, d).requires_grad_()
    dout = rand(b, hq, t, d)

    def forward():
        return attention(q, k, v, hq // hkv)

    def forward_only():
        with torch.no_grad():
            forward()

    def forward_backward():
        out = forward()
        out.backward(dout)

    fwd_ms = timed(forward_only, a.warmup, a.reps)
    both_ms = timed(forward_backward, a.warmup, a.reps)
    bwd_ms = both_ms - fwd_ms
    fwd_flops = 4.0 * d * b * hq * t * (t + 1) / 2
    bwd_flops = 2.5 * fwd_flops
    print(f"PyTorch {torch.__version__} SDPA (causal, bf16) on {torch.cuda.get_device_name()}: "
          f"b {b}, heads {hq}/{hkv}, t {t}, d {d}")
    print(f"  forward   {fwd_ms:8.3f} ms  {fwd_flops / fwd_ms / 1e9:7.1f} TFLOP/s")
    print(f"  backward  {bwd_ms:8.3f} ms  {bwd_flops / bwd_ms / 1e9:7.1f} TFLOP/s "
          f"(forward + backward {both_ms:.3f} ms, less the forward)")
    print(json.dumps({"fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
                      "fwd_tflops": fwd_flops / fwd_ms / 1e9,
                      "bwd_tflops": bwd_flops / bwd_ms / 1e9}))


if __name__ == "__main__":
    main()
