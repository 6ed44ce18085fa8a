#!/usr/bin/env python3
"""End-to-end check with independent tools: numpy writes a small Hugging Face Llama model
(GQA, sharded safetensors written by hand from the format's specification), `eellm convert`
turns it into a checkpoint split for tp 2 x pp 2, and h5py reads the checkpoint's top-level file:
every tensor must come back whole, with the values written. Exit code 0 on success.

usage: h5py_check.py <path to the eellm binary> <scratch directory>
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import h5py
import numpy as np


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    eellm, scratch = sys.argv[1], sys.argv[2]
    shutil.rmtree(scratch, ignore_errors=True)
    hf = os.path.join(scratch, "hf")
    os.makedirs(hf)
    h, layers, heads, kv, ffn, vocab = 16, 4, 4, 2, 24, 32
    d = h // heads
    rng = np.random.default_rng(7)
    t = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,),
         "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (heads * d, h),
                  p + "self_attn.k_proj.weight": (kv * d, h),
                  p + "self_attn.v_proj.weight": (kv * d, h),
                  p + "self_attn.o_proj.weight": (h, heads * d),
                  p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                  p + "mlp.down_proj.weight": (h, ffn)})
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        write_safetensors(os.path.join(hf, fname), {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                   "weight_map": weight_map}, f)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv,
                   "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False}, f)
    out = os.path.join(scratch, "ckpt")
    subprocess.run([eellm, "convert", "hf-to-eellm", f"--input={hf}", f"--output={out}",
                    "--tp=2", "--pp=2"], check=True)
    top = os.path.join(out, "step_00000000", "model.h5")
    assert len([n for n in os.listdir(os.path.dirname(top)) if n.startswith("shard_")]) == 4
    rename = {"model.embed_tokens.weight": "embedding.word.weight",
              "model.norm.weight": "final_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
             "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
             "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
             "mlp.gate_proj": "mlp.fc1", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.fc2"}
    checked = 0
    with h5py.File(top, "r") as f:
        config = json.loads(f.attrs["config"])
        assert config["num_kv_heads"] == kv, config
        for name, want in tensors.items():
            ours = rename.get(name)
            if ours is None:
                i = name.split(".")[2]
                hf_part = name[len(f"model.layers.{i}."):-len(".weight")]
                ours = f"layers.{i}.{parts[hf_part]}.weight"
            got = f["model"][ours][()]
            assert got.shape == want.shape, (ours, got.shape, want.shape)
            assert np.array_equal(got, want), f"{ours} differs from {name}"
            checked += 1
    print(f"h5py read {checked} whole tensors from {top}: all equal to the safetensors source")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
