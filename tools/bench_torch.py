#!/usr/bin/env python3
"""PyTorch reference for `eellm bench train`: the same architecture as an eellm model config
(Llama or GPT-2 style, with early-exit heads), trained in bf16 autocast with fp32 master
weights, SDPA (flash) attention, torch.compile and fused AdamW, on random tokens. Prints a
report and, last, one JSON line {"tokens_per_s", "tflops", "mfu", "peak_mem_gb", ...} that
`eellm bench train --torch-reference tools/bench_torch.py` reads to print the ratio.

Model FLOPs per token are counted exactly as eellm counts them (launch/bench_train.cc):
6 * N_matmul + 12 * L_attn * (heads * head_dim) * seq.

usage: bench_torch.py --model configs/bench/llama_1p3b.json [--batch 8] [--seq 2048]
                      [--steps 5] [--warmup 2] [--no-compile] [--no-exits] [--device cuda]

--device cpu (what `eellm bench train` passes for its CPU backend) computes in fp32, as eellm's CPU
backend does, and works with any PyTorch >= 1.13 (without SDPA or torch.compile it falls back to
plain attention and eager mode and says so).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_config(path):
    with open(path) as f:
        j = json.load(f)
    c = j.get("model", j)
    c.setdefault("num_kv_heads", c["num_heads"])
    c.setdefault("norm_eps", 1e-5)
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("tie_embeddings", c["style"] == "gpt")
    # The reference models the speed of plain GPT and Llama blocks only.
    unsupported = [k for k in ("qkv_bias", "qk_norm", "rope_scaling") if c.get(k)]
    if c.get("head_dim") and c["head_dim"] * c["num_heads"] != c["hidden_size"]:
        unsupported.append("head_dim")
    if unsupported:
        raise SystemExit(f"bench_torch.py: {', '.join(unsupported)} not modelled here")
    if not c.get("ffn_hidden_size"):
        h = c["hidden_size"]
        c["ffn_hidden_size"] = 4 * h if c["style"] == "gpt" else (8 * h // 3 + 63) // 64 * 64
    for x in c.setdefault("exits", []):
        x.setdefault("kind", "norm")
        x.setdefault("position", "post")
        x.setdefault("tied", False)
        x.setdefault("loss_weight", 1.0)
    return c


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(c):
    if c["style"] == "gpt":
        return nn.LayerNorm(c["hidden_size"], eps=c["norm_eps"])
    return RMSNorm(c["hidden_size"], c["norm_eps"])


def rope_tables(c, seq, device):
    d = c["hidden_size"] // c["num_heads"]
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):  # x: [b, h, t, d]; rotate_half convention
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rot * sin).type_as(x)


def attention(q, k, v, group):
    """Causal attention, q: [b, hq, t, d], k/v: [b, hkv, t, d] with hq = group * hkv."""
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    if sdpa is not None and group > 1:
        try:  # PyTorch >= 2.5: grouped heads without copying K/V
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:
            pass
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if sdpa is not None:
        return sdpa(q, k, v, is_causal=True)
    t = q.shape[-2]  # PyTorch < 2.0 (CPU smoke tests only)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(mask, float("-inf")).softmax(-1).type_as(v) @ v


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, f, bias = c["hidden_size"], c["ffn_hidden_size"], c["style"] == "gpt"
        self.gpt = c["style"] == "gpt"
        self.fc1 = nn.Linear(h, f, bias=bias)
        if not self.gpt:
            self.up = nn.Linear(h, f, bias=False)
        self.fc2 = nn.Linear(f, h, bias=bias)

    def forward(self, x):
        if self.gpt:
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return self.fc2(F.silu(self.fc1(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hq, hkv = c["hidden_size"], c["num_heads"], c["num_kv_heads"]
        d = h // hq
        bias = c["style"] == "gpt"
        self.c, self.hq, self.hkv, self.d = c, hq, hkv, d
        self.attn_norm = make_norm(c)
        self.wq = nn.Linear(h, hq * d, bias=bias)
        self.wk = nn.Linear(h, hkv * d, bias=bias)
        self.wv = nn.Linear(h, hkv * d, bias=bias)
        self.wo = nn.Linear(hq * d, h, bias=bias)
        self.mlp_norm = make_norm(c)
        self.mlp = Mlp(c)

    def forward(self, x, rope):
        b, t, _ = x.shape
        a = self.attn_norm(x)
        q = self.wq(a).view(b, t, self.hq, self.d).transpose(1, 2)
        k = self.wk(a).view(b, t, self.hkv, self.d).transpose(1, 2)
        v = self.wv(a).view(b, t, self.hkv, self.d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q, k, v, self.hq // self.hkv)
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, self.hq * self.d))
        return x + self.mlp(self.mlp_norm(x))


class Exit(nn.Module):
    def __init__(self, c, x):
        super().__init__()
        self.kind, self.tied = x["kind"], x["tied"]
        if self.kind == "mlp":
            self.branch_norm, self.branch = make_norm(c), Mlp(c)
        if self.kind == "block":
            self.block = Block(c)
        self.norm = make_norm(c) if self.kind != "linear" else None
        if not self.tied:
            self.head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, h, rope, embedding):
        if self.kind == "mlp":
            h = h + self.branch(self.branch_norm(h))
        if self.kind == "block":
            h = self.block(h, rope)
        if self.norm is not None:
            h = self.norm(h)
        return F.linear(h, embedding) if self.tied else self.head(h)


class Model(nn.Module):
    def __init__(self, c, with_exits=True):
        super().__init__()
        self.c = c
        h, v = c["hidden_size"], c["vocab_size"]
        self.embed = nn.Embedding(v, h)
        self.pos = nn.Embedding(c["max_seq_len"], h) if c["style"] == "gpt" else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_layers"]))
        self.final_norm = make_norm(c)
        self.output = None if c["tie_embeddings"] else nn.Linear(h, v, bias=False)
        exits = c["exits"] if with_exits else []
#depth : the number of layers whose output the exit reads
        self.exit_depths = [x["layer"] if x["position"] == "post" else x["layer"] - 1 for x in exits]
        self.exit_weights = [x["loss_weight"] for x in exits]
        self.exits = nn.ModuleList(Exit(c, x) for x in exits)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets):
        b, t = ids.shape
        x = self.embed(ids)
        rope = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=ids.device))
        else:
            rope = rope_tables(self.c, t, ids.device)
        losses = []

        def ce(logits):
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))

        for depth in range(len(self.layers) + 1):
            for e, d in enumerate(self.exit_depths):
                if d == depth:
                    losses.append(self.exit_weights[e] * ce(self.exits[e](x, rope, self.embed.weight)))
            if depth < len(self.layers):
                x = self.layers[depth](x, rope)
        x = self.final_norm(x)
        logits = F.linear(x, self.embed.weight) if self.output is None else self.output(x)
        return ce(logits) + sum(losses)


def flops_per_token(model, c, seq):
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and not n.startswith(("embed.", "pos.")))
    tied = (1 if c["tie_embeddings"] else 0) + sum(1 for e in model.exits if e.tied)
    matmul += tied * c["vocab_size"] * c["hidden_size"]
    attn_layers = c["num_layers"] + sum(1 for e in model.exits if e.kind == "block")
    return 6 * matmul + 12 * attn_layers * c["hidden_size"] * seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="sequences per forward/backward; gradients accumulate over batch / "
                         "micro-batch of them before the optimizer step (0 = batch)")
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-exits", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    c = load_config(args.model)
    seq = args.seq or c["max_seq_len"]
    micro = args.micro_batch or args.batch
    if args.batch % micro != 0:
        sys.exit("batch %d is not a multiple of micro-batch %d" % (args.batch, micro))
    dev = args.device
    cuda = dev == "cuda"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = Model(c, with_exits=not args.no_exits).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({
  "fused" : True} if cuda else {}))
    compiled = not args.no_compile and hasattr(torch, "compile")
    if not args.no_compile and not compiled:
        print("note: this PyTorch has no torch.compile; running eagerly", file=sys.stderr)
    fwd = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = torch.randint(0, c["vocab_size"], (args.batch, seq), device=dev)
    tgt = torch.randint(0, c["vocab_size"], (args.batch, seq), device=dev)

    def step():  # returns the batch's loss
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(0, args.batch, micro):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                loss = fwd(ids[m:m + micro], tgt[m:m + micro]) * (micro / args.batch)
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return total

    for _ in range(max(args.warmup, 1)):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - start) / args.steps
    tokens = args.batch * seq / dt
    fpt = flops_per_token(model, c, seq)
    tflops = fpt * tokens / 1e12
    result = {"tokens_per_s": tokens, "step_ms": dt * 1e3, "tflops": tflops,
              "mfu": tflops / args.peak_tflops,
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "flops_per_token": fpt, "compiled": compiled, "device": dev,
              "exits": len(model.exits), "torch": torch.__version__}
    print("PyTorch %s on %s (%s): %.1f M params, step %.1f ms, %.0f tokens/s, %.1f TFLOP/s, MFU %.1f%%, "
          "peak %.1f GB" % (torch.__version__, dev, "bf16 autocast" if cuda else "fp32",
                            result["params_m"], result["step_ms"], tokens,
                            tflops, 100 * result["mfu"], result["peak_mem_gb"]))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
