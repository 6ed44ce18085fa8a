#!/usr/bin/env python3
"""Checks eellm against Hugging Face transformers and tokenizers.

Needs torch, transformers, safetensors and numpy (tokenizers optional) and a built `eellm`.
For each small random model defined below (Mistral with a sliding window, Qwen2 with tied
embeddings, Qwen3, Llama with grouped-query attention, Llama with tied embeddings, Llama 3
RoPE scaling, GPT-2), in fp32:

  1. builds it with transformers, perturbs every parameter (so norm gains and biases are not
     their trivial initial values) and save_pretrained()s it (safetensors) to a temporary dir;
  2. `eellm convert hf-to-eellm --input HF --output CKPT`;
  3. `eellm logits --checkpoint CKPT --tokens 1,2,... --backend B` (prints {"logits": [[...]]})
     for each backend, compared with transformers' logits on the same tokens;
  4. `eellm convert eellm-to-hf --input CKPT --output HF2`, loads HF2 with from_pretrained and
     compares its state dict (must be bit-identical) and its logits with the original's.

Errors are max|a - b| / max|b| (b: transformers). The script exits non-zero when an fp32 (cpu)
error exceeds --tol (1e-4), a cuda error exceeds --cuda-tol (bf16 compute), a command fails or
the round trip changes a tensor.

With the `tokenizers` package it also trains two small BPE tokenizers (byte-level as GPT-2 and
Llama-3 use, SentencePiece-style with byte fallback as Llama-2 uses) on generated text, saves
their tokenizer.json, runs `eellm data --tokenizer tokenizer.json` on the text and checks that
the token files (train + val concatenated) equal tokenizers' encoding. More tokenizer.json files
(e.g. from a local Hugging Face cache) can be checked with --tokenizer-json.

Usage: python3 tools/hf_check.py [--eellm build/eellm] [--backends cpu,cuda] [--keep DIR]
"""

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

# Small models: (transformers class family, config kwargs).
MODELS = {
    # Mistral: Llama with a sliding window (here exactly the tokens checked; eellm cuts its
    # context to the window). Exported back as Llama.
    "mistral-window": (
        "mistral",
        dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=23,  # NUM_TOKENS
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2: Llama with biases on q, k and v; tied embeddings as its small models have.
    "qwen2-tied": (
        "qwen2",
        dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
    # Qwen3: q and k RMSNorms per head, heads wider than hidden / heads; tied embeddings.
    "qwen3-tied": (
        "qwen3",
        dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
    "llama-gqa": (
        "llama",
        dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
    "llama-tied": (
        "llama",
        dict(
            vocab_size=300,
            hidden_size=48,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    # Llama 3.1 / 3.2: "llama3" RoPE scaling, here for a 64-token original context so that the
    # 8 pairs of a head fall in every band (kept, blended, divided) within NUM_TOKENS.
    "llama3-scaled": (
        "llama",
        dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "gpt2": (
        "gpt2",
        dict(
            vocab_size=300,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_inner=None,
            n_positions=128,
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
}

NUM_TOKENS = 23


class CheckFailed(Exception):
    pass


def run(cmd, what):
    """Runs cmd; returns stdout; raises CheckFailed with stderr on failure."""
    print("  $ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise CheckFailed(
            "%s failed (exit %d):\n%s%s" % (what, p.returncode, p.stdout[-2000:], p.stderr[-4000:])
        )
    return p.stdout


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise CheckFailed("shape mismatch: %s vs %s" % (a.shape, b.shape))
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def parse_logits(stdout):
    """The JSON object {"logits": [[...]]} printed by `eellm logits`."""
    text = stdout.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                    break
                except ValueError:
                    continue
    if not isinstance(obj, dict) or "logits" not in obj:
        raise CheckFailed("eellm logits printed no {\"logits\": ...} object:\n" + text[-2000:])
    return np.asarray(obj["logits"], dtype=np.float64)


def build_hf_model(family, kwargs, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    elif family == "mistral":
        config = transformers.MistralConfig(**kwargs)
        model = transformers.MistralForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**kwargs)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**kwargs)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.GPT2Config(**kwargs)
        model = transformers.GPT2LMHeadModel(config)
    model = model.to(torch.float32)
    with torch.no_grad():
        # named_parameters() lists tied weights once, so ties survive.
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].to(torch.float64).numpy()


def check_model(name, family, kwargs, args, tmp, results):
    import torch
    import transformers

    print("== %s" % name, flush=True)
    model = build_hf_model(family, kwargs, seed=1234)
    vocab = kwargs["vocab_size"]
    rng = random.Random(99)
    ids = [rng.randrange(vocab) for _ in range(NUM_TOKENS)]
    ref = hf_logits(model, ids)
    hf_dir = os.path.join(tmp, name + "-hf")
    ckpt = os.path.join(tmp, name + "-eellm")
    hf_dir2 = os.path.join(tmp, name + "-hf2")
    model.save_pretrained(hf_dir, safe_serialization=True)
    run(
        [args.eellm, "convert", "hf-to-eellm", "--input=" + hf_dir, "--output=" + ckpt],
        "convert hf-to-eellm",
    )
    for backend in args.backends:
        tol = args.tol if backend == "cpu" else args.cuda_tol
        try:
            out = run(
                [
                    args.eellm,
                    "logits",
                    "--checkpoint=" + ckpt,
                    "--tokens=" + ",".join(str(i) for i in ids),
                    "--backend=" + backend,
                ],
                "eellm logits (%s)" % backend,
            )
            err = rel_err(parse_logits(out), ref)
            results.append((name, "eellm %s vs transformers" % backend, err, tol))
        except CheckFailed as e:
            results.append((name, "eellm %s vs transformers" % backend, None, tol))
            print(str(e), file=sys.stderr)

    run(
        [args.eellm, "convert", "eellm-to-hf", "--input=" + ckpt, "--output=" + hf_dir2],
        "convert eellm-to-hf",
    )
    # Mistral comes back as Llama, Qwen2 and Qwen3 as themselves.
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }.get(family, transformers.LlamaForCausalLM)
    # The files are fp32 (config torch_dtype float32); .to() guards against other defaults.
    model2 = cls.from_pretrained(hf_dir2).to(torch.float32)
    model2.eval()
    sd1, sd2 = model.state_dict(), model2.state_dict()
    worst = 0.0
    for key, t in sd1.items():
        if key not in sd2:
            raise CheckFailed("%s: tensor %s missing after eellm-to-hf" % (name, key))
        if t.is_floating_point():
            worst = max(worst, float((t - sd2[key]).abs().max()) if t.numel() else 0.0)
    results.append((name, "HF -> eellm -> HF weights (max abs diff)", worst, 0.0))
    results.append((name, "HF -> eellm -> HF logits", rel_err(hf_logits(model2, ids), ref), args.tol))


# ---- tokenizers --------------------------------------------------------------------------------


def make_text(seed=7, lines=3000):
    """Deterministic text with words, numbers, punctuation, spacing and some non-ASCII."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "qu", "an", "el", "or", "th", "sh"]
    extra = ["café", "naïve", "Über", "größe", "東京", "中文字", "😀", "€", "—", "ñandú", "Ωmega"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    punct = [",", ".", ";", ":", "!", "?", "'s", "'ll", "(", ")", '"', "-", "..."]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(0, 16)):
            r = rng.random()
            if r < 0.70:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.15 else w)
            elif r < 0.80:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif r < 0.93:
                parts.append(rng.choice(punct))
            else:
                parts.append(rng.choice(extra))
        sep = "  " if rng.random() < 0.05 else " "
        line = sep.join(parts)
        if rng.random() < 0.05:
            line = "\t" + line
        out.append(line)
    return "\n".join(out) + "\n"


def train_byte_level(lines):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def train_sentencepiece_style(lines):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


def read_token_file(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 16 or data[:8] != b"EELLMTOK":
        raise CheckFailed("%s: not an eellm token file" % path)
    version, width = struct.unpack("<II", data[8:16])
    if version != 1 or width not in (2, 4):
        raise CheckFailed("%s: version %d, %d bytes per token" % (path, version, width))
    return np.frombuffer(data[16:], dtype="<u2" if width == 2 else "<u4").astype(np.int64)


def check_tokenizer(label, tok_json, text_path, text, args, tmp, results):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_json)
    ref = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    prefix = os.path.join(tmp, "tok-" + label)
    try:
        run(
            [
                args.eellm,
                "data",
                "--input=" + text_path,
                "--output=" + prefix,
                "--tokenizer=" + tok_json,
                "--val_fraction=0.1",
            ],
            "eellm data (%s)" % label,
        )
        got = np.concatenate(
            [read_token_file(prefix + ".train.bin"), read_token_file(prefix + ".val.bin")]
        )
    except CheckFailed as e:
        print(str(e), file=sys.stderr)
        results.append(("tokenizer " + label, "token ids equal", None, 0.0))
        return
    n = min(len(got), len(ref))
    diff = np.nonzero(got[:n] != ref[:n])[0]
    if len(got) == len(ref) and len(diff) == 0:
        results.append(("tokenizer " + label, "token ids equal (%d tokens)" % len(ref), 0.0, 0.0))
        return
    first = int(diff[0]) if len(diff) else n
    lo = max(0, first - 3)
    print(
        "tokenizer %s: eellm gives %d tokens, tokenizers %d; first difference at token %d\n"
        "  eellm:      %s\n  tokenizers: %s\n  text there: %r"
        % (
            label,
            len(got),
            len(ref),
            first,
            got[lo : first + 4].tolist(),
            ref[lo : first + 4].tolist(),
            tok.decode(ref[lo : first + 4].tolist()),
        ),
        file=sys.stderr,
    )
    results.append(("tokenizer " + label, "token ids equal", 1.0, 0.0))


def tokenizer_checks(args, tmp, results):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("== tokenizers is not installed: tokenizer checks skipped")
        return
    print("== tokenizers", flush=True)
    text = make_text()
    text_path = os.path.join(tmp, "text.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(text)
    lines = text.splitlines()
    for label, train in (
        ("byte-level", train_byte_level),
        ("sentencepiece-style", train_sentencepiece_style),
    ):
        path = os.path.join(tmp, label + ".tokenizer.json")
        train(lines).save(path)
        check_tokenizer(label, path, text_path, text, args, tmp, results)
    for i, path in enumerate(args.tokenizer_json or []):
        check_tokenizer("file%d" % i, path, text_path, text, args, tmp, results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--eellm", default="build/eellm", help="the eellm binary")
    ap.add_argument("--backends", default="cpu", help="comma-separated: cpu, cuda")
    ap.add_argument("--tol", type=float, default=1e-4, help="fp32 (cpu) relative error bound")
    ap.add_argument(
        "--cuda-tol", type=float, default=5e-2, help="cuda relative error bound (bf16 compute)"
    )
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of models")
    ap.add_argument("--tokenizer-json", action="append", help="also check this tokenizer.json")
    ap.add_argument("--no-tokenizers", action="store_true", help="skip the tokenizer checks")
    ap.add_argument("--keep", help="write the temporary files here and keep them")
    args = ap.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    if not os.path.exists(args.eellm):
        print("error: %s not found (build eellm or pass --eellm)" % args.eellm, file=sys.stderr)
        return 2

    tmp = args.keep or tempfile.mkdtemp(prefix="eellm-hf-check-")
    os.makedirs(tmp, exist_ok=True)
    results = []  # (model, check, error or None when it failed to run, tolerance)
    failed_to_run = False
    try:
        for name in args.models.split(","):
            if name not in MODELS:
                print("error: unknown model %s (%s)" % (name, ", ".join(MODELS)), file=sys.stderr)
                return 2
            family, kwargs = MODELS[name]
            try:
                check_model(name, family, kwargs, args, tmp, results)
            except CheckFailed as e:
                print(str(e), file=sys.stderr)
                failed_to_run = True
        if not args.no_tokenizers:
            tokenizer_checks(args, tmp, results)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n%-22s %-42s %12s %10s  %s" % ("model", "check", "error", "bound", "result"))
    ok = not failed_to_run
    for model, check, err, tol in results:
        good = err is not None and err <= tol
        ok &= good
        shown = "not run" if err is None else "%.3e" % err
        print("%-22s %-42s %12s %10.1e  %s" % (model, check, shown, tol, "ok" if good else "FAIL"))
    if failed_to_run:
        print("some checks did not run (see the errors above)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
