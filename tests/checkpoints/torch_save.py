"""Writes files in torch.save's zip format with Python's standard library only (no PyTorch), as
test fixtures for checkpoints/torch_file.h and the Megatron-LM checkpoint importer.

torch.save pickles the object (protocol 2) with a persistent id for each storage,
("storage", torch.<Type>Storage, key, location, numel), and tensors as calls of
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks). Here stub
modules named torch and torch._utils stand in for PyTorch, so CPython's own pickler writes the same
opcodes; the zip holds <archive>/data.pkl, <archive>/data/<key>, <archive>/version and
<archive>/byteorder, stored uncompressed, as torch does.

Usage as a script:
  torch_save.py basic OUT.pt [PROTOCOL]   the file tests/checkpoints/torch_file_test.cc reads
  torch_save.py megatron TENSORS.safetensors SPEC.json OUTDIR
                                          a Megatron-LM / EE-LLM checkpoint of eellm tensors
                                          (tests/launch/megatron_convert_test.cc)
"""
import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

_torch = types.ModuleType("torch")
_utils = types.ModuleType("torch._utils")
_torch._utils = _utils
sys.modules.setdefault("torch", _torch)
sys.modules.setdefault("torch._utils", _utils)


def _storage_class(name):
    cls = type(name, (), {})
    cls.__module__ = "torch"
    setattr(_torch, name, cls)
    return cls


STORAGE_CLASS = {t: _storage_class(t + "Storage")
                 for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Byte")}
ELEMENT = {"Float": "f", "Half": "e", "Double": "d", "Long": "q", "Int": "i", "Byte": "B"}


def _rebuild_tensor_v2(*args):
    raise RuntimeError("fixture writer only")


def _rebuild_parameter(*args):
    raise RuntimeError("fixture writer only")


for _f in (_rebuild_tensor_v2, _rebuild_parameter):
    _f.__module__ = "torch._utils"
    _f.__qualname__ = _f.__name__
    setattr(_utils, _f.__name__, _f)


class _Dtype:
    """torch.bfloat16 and friends pickle as globals of module torch."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return self.name


_Dtype.__module__ = "torch"


for _d in ("float32", "float16", "bfloat16"):
    setattr(_torch, _d, _Dtype(_d))


def encode(kind, values):
    """Little-endian bytes of `values` as storage type `kind` ("Float", "BFloat16", ...)."""
    if kind == "BFloat16":  # the upper half of the fp32 bits, rounded to nearest even
        out = bytearray()
        for v in values:
            u = struct.unpack("<I", struct.pack("<f", v))[0]
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            out += struct.pack("<H", u & 0xFFFF)
        return bytes(out)
    return struct.pack("<%d%s" % (len(values), ELEMENT[kind]), *values)


class Storage:
    def __init__(self, kind, values):
        self.kind = kind
        self.numel = len(values)
        self.data = encode(kind, values)


class Tensor:
    """A view of `storage`: offset, size and stride in elements (row-major stride by default)."""

    def __init__(self, storage, size, offset=0, stride=None, parameter=False):
        self.storage, self.size, self.offset = storage, tuple(size), offset
        if stride is None:
            stride, s = [], 1
            for n in reversed(size):
                stride.insert(0, s)
                s *= n
        self.stride = tuple(stride)
        self.parameter = parameter

    def __reduce_ex__(self, protocol):
        if self.parameter:  # torch.nn.Parameter: a rebuild around the plain tensor
            data = Tensor(self.storage, self.size, self.offset, self.stride)
            return (_rebuild_parameter, (data, True, collections.OrderedDict()))
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                     collections.OrderedDict()))


def tensor(kind, values, size=None, **kw):
    return Tensor(Storage(kind, values), size if size is not None else (len(values),), **kw)


def save(obj, path, archive="archive", protocol=2):
    storages = []

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                for k, s in enumerate(storages):
                    if s is o:
                        break
                else:
                    storages.append(o)
                    k = len(storages) - 1
                return ("storage", STORAGE_CLASS[o.kind], str(k), "cpu", o.numel)
            return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(archive + "/data.pkl", buf.getvalue())
        z.writestr(archive + "/byteorder", "little")
        for k, s in enumerate(storages):
            z.writestr("%s/data/%d" % (archive, k), s.data)
        z.writestr(archive + "/version", "3\n")


def basic():
    """The object tests/checkpoints/torch_file_test.cc checks, value by value."""
    shared = Storage("Float", [float(i) for i in range(12)])
    state = collections.OrderedDict()
    state["f32"] = Tensor(shared, (3, 4))
    state["f32_t"] = Tensor(shared, (4, 3), stride=(1, 4))  # a transposed view
    state["f32_tail"] = Tensor(shared, (2, 2), offset=5, stride=(4, 1))
    state["bf16"] = tensor("BFloat16", [0.5, -1.25, 3.0, 1024.0, -0.015625, 7.0], (2, 3))
    state["f16"] = tensor("Half", [0.5, -2.0, 65504.0, 6.103515625e-05], (2, 2), parameter=True)
    state["f64"] = tensor("Double", [1.0 / 3.0, -2.5], (2,))
    state["i64"] = tensor("Long", [1, 2, 3], (3,))
    state["empty"] = tensor("Float", [], (0, 4))
    state._metadata = collections.OrderedDict([("", {"version": 1})])
    # Views no reader may follow: huge sizes, a negative offset, a stride past the storage, a
    # storage claiming more elements than its entry holds, a stride-0 view of 2^40 elements.
    liar = Storage("Float", [1.0, 2.0])
    liar.numel = 10**12
    hostile = {
        "huge": Tensor(shared, (2**40, 2**40)),
        "negative_offset": Tensor(shared, (2,), offset=-1),
        "stride": Tensor(shared, (2, 2), stride=(100, 1)),
        "overflow": Tensor(shared, (2, 2), stride=(2**62, 1)),
        "liar": Tensor(liar, (1000,)),
        "broadcast": Tensor(shared, (2**40,), stride=(0,)),
    }
    args = argparse.Namespace(num_layers=4, hidden_size=64, swiglu=True, norm="RMSNorm",
                              exit_layer_nums=[2, 3], params_dtype=_torch.bfloat16,
                              lr=1.5e-4, nothing=None)
    return {
        "args": args,
        "iteration": 1000,
        "model": {"language_model": state},
        "hostile": hostile,
        "misc": {"big": 2**70, "neg": -300, "bytes": b"\x00\xff\x10", "tuple": (1, "two", 3.5),
                 "set": {7}, "nested": [[1, 2], [3]], "shared": [shared, shared],
                 "unicode": "h\u00e9\u4e16 a\\b\n\U0001F600", "false": False},
    }


def read_safetensors(path):
    """{name: (shape, [float])} of an F32 safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t
        a, b = t["data_offsets"]
        out[name] = (list(t["shape"]), list(struct.unpack("<%df" % ((b - a) // 4), data[a:b])))
    return out


def rows(t, begin, count):
    shape, v = t
    w = len(v) // shape[0] if shape[0] else 0
    return [count] + shape[1:], v[begin * w:(begin + count) * w]


def cat_rows(parts):
    return [sum(p[0][0] for p in parts)] + parts[0][0][1:], [x for p in parts for x in p[1]]


def columns(t, begin, count):
    (r, c), v = t
    return [r, count], [v[i * c + j] for i in range(r) for j in range(begin, begin + count)]


def to_mcore(lm, tied_copy):
    """A legacy stage's tensors under Megatron-core's GPTModel names, with Transformer Engine's
    layers (norms fused into linear_qkv and linear_fc1, _extra_state entries)."""
    flat = collections.OrderedDict()
    for name in ("word_embeddings", "position_embeddings"):
        if name in lm.get("embedding", {}):
            flat["embedding.%s.weight" % name] = lm["embedding"][name]["weight"]
    for k, t in lm["encoder"].items():
        for legacy, core in (("input_norm.", "self_attention.linear_qkv.layer_norm_"),
                             ("post_attention_norm.", "mlp.linear_fc1.layer_norm_"),
                             ("self_attention.query_key_value.", "self_attention.linear_qkv."),
                             ("self_attention.dense.", "self_attention.linear_proj."),
                             ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
                             ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
                             ("final_norm.", "final_layernorm.")):
            k = k.replace(legacy, core)
        flat["decoder." + k] = t
        if k.endswith("linear_qkv.weight"):
            flat["decoder." + k.replace(".weight", "._extra_state")] = None
        if k.endswith("linear_fc1.weight"):
            flat["decoder." + k.replace(".weight", "._extra_state")] = tensor("Byte", [1, 2, 3])
    if "output_layer" in lm:
        flat["output_layer.weight"] = lm["output_layer"]["weight"]
    elif tied_copy is not None:
        flat["output_layer.weight"] = tied_copy["weight"]
    return flat


def megatron(tensors_path, spec_path, out):
    """Writes the eellm tensors of `tensors_path` (whole model) as a Megatron-LM / EE-LLM
    checkpoint in `out`, laid out as EE-LLM's checkpointing.py and model code lay it out: spec
    {"args": {...}, "iteration": N, "dtype": "Float" | "BFloat16", "old_names": bool,
    "mcore": bool (Megatron-core names)}."""
    e = read_safetensors(tensors_path)
    spec = json.load(open(spec_path))
    a = spec["args"]
    tp, pp = a["tensor_model_parallel_size"], a["pipeline_model_parallel_size"]
    L, n, d = a["num_layers"], a["num_attention_heads"], a["kv_channels"]
    G = a["num_query_groups"] if a.get("group_query_attention") else n
    per, f, V = n // G, a["ffn_hidden_size"], a["padded_vocab_size"]
    swiglu, exits = a.get("swiglu", False), a.get("exit_layer_nums", [])
    kind = "block" if a.get("use_exit_block") else "mlp" if a.get("use_exit_mlp") else None
    norm_name = "layernorm" if spec.get("old_names") else "norm"
    # eellm exit index k of each exit layer (exits sorted by layer).
    k_of = {l: k for k, l in enumerate(sorted(exits))}
    dtype = spec.get("dtype", "Float")
    it = spec["iteration"]
    it_dir = os.path.join(out, "iter_%07d" % it)

    def T(t):
        return Tensor(Storage(dtype, t[1]), tuple(t[0]))

    def N(t, wb):
        """A norm's tensor; LayerNorm1P stores the gains less one."""
        if wb == "weight" and a.get("apply_layernorm_1p") and a["normalization"] == "LayerNorm":
            t = (t[0], [x - 1.0 for x in t[1]])
        return T(t)

    def block(src, dst, r, with_mlp=True, trunk=False):
        """A transformer layer's tensors eellm `src` -> Megatron `dst` for tensor rank r."""
        has = lambda x: src + x in e
        for wb in ("weight", "bias"):
            if has("attn_norm." + wb):
                dst["input_%s.%s" % (norm_name, wb)] = N(e[src + "attn_norm." + wb], wb)
            if has("mlp_norm." + wb):
                dst["post_attention_%s.%s" % (norm_name, wb)] = N(e[src + "mlp_norm." + wb], wb)
            if has("attn.wq." + wb):
                q, k, v = (e[src + "attn.w%s.%s" % (x, wb)] for x in "qkv")
                groups = []
                for g in range(r * G // tp, (r + 1) * G // tp):
                    groups += [rows(q, g * per * d, per * d), rows(k, g * d, d), rows(v, g * d, d)]
                dst["self_attention.query_key_value." + wb] = T(cat_rows(groups))
        dst["self_attention.dense.weight"] = T(columns(e[src + "attn.wo.weight"],
                                                       r * n * d // tp, n * d // tp))
        if has("attn.wo.bias"):
            dst["self_attention.dense.bias"] = T(e[src + "attn.wo.bias"])
        if with_mlp:
            mlp(src + "mlp.", dst, "mlp.trunk." if trunk else "mlp.", r)

    def mlp(src, dst, to, r):
        for wb in ("weight", "bias"):
            if src + "fc1." + wb not in e:
                continue
            shard = rows(e[src + "fc1." + wb], r * f // tp, f // tp)
            if swiglu:
                shard = cat_rows([shard, rows(e[src + "up." + wb], r * f // tp, f // tp)])
            dst[to + "dense_h_to_4h." + wb] = T(shard)
        dst[to + "dense_4h_to_h.weight"] = T(columns(e[src + "fc2.weight"], r * f // tp, f // tp))
        if src + "fc2.bias" in e:
            dst[to + "dense_4h_to_h.bias"] = T(e[src + "fc2.bias"])

    per_stage = L // pp
    for s in range(pp):
        for r in range(tp):
            lm = {}
            if s == 0:
                emb = {"word_embeddings": {"weight": T(rows(e["embedding.word.weight"],
                                                            r * V // tp, V // tp))}}
                if "embedding.position.weight" in e:
                    emb["position_embeddings"] = {"weight": T(e["embedding.position.weight"])}
                lm["embedding"] = emb
            enc = collections.OrderedDict()
            stage_exits = [l for l in exits if s * per_stage < l <= (s + 1) * per_stage]
            for i in range(per_stage):
                g = s * per_stage + i
                layer = collections.OrderedDict()
                has_exit = (g + 1) in exits
                block("layers.%d." % g, layer, r, trunk=has_exit and kind == "mlp")
                if has_exit:
                    x = "exits.%d." % k_of[g + 1]
                    for wb in ("weight", "bias"):
                        if x + "norm." + wb in e:
                            layer["exit_%s.%s" % (norm_name, wb)] = N(e[x + "norm." + wb], wb)
                    if kind == "mlp":  # a pre exit does not use it: a copy of the layer's MLP
                        src = x + "mlp." if x + "mlp.fc1.weight" in e else "layers.%d.mlp." % g
                        mlp(src, layer, "mlp.branch.", r)
                    if kind == "block":
                        sub = collections.OrderedDict()
                        block(x + "block.", sub, r)
                        for name, t in sub.items():
                            layer["exit_block." + name] = t
                for name, t in layer.items():
                    enc["layers.%d.%s" % (i, name)] = t
            if s == pp - 1:
                for wb in ("weight", "bias"):
                    if "final_norm." + wb in e:
                        enc["final_%s.%s" % (norm_name, wb)] = N(e["final_norm." + wb], wb)
            enc._metadata = collections.OrderedDict()
            lm["transformer" if spec.get("old_names") else "encoder"] = enc
            if s == pp - 1 and "output.weight" in e:
                lm["output_layer"] = {"weight": T(rows(e["output.weight"], r * V // tp, V // tp))}
            if stage_exits and a.get("untie_exit_output_weights"):
                lm["exit_output_layer"] = collections.OrderedDict(
                    ("%d.weight" % i, T(rows(e["exits.%d.head.weight" % k_of[l]],
                                             r * V // tp, V // tp)))
                    for i, l in enumerate(stage_exits))
            model = {"language_model": lm}
            tied_copy = s > 0 and not a.get("untie_embeddings_and_output_weights") and (
                s == pp - 1 or stage_exits)
            if tied_copy:
                model["word_embeddings_for_head"] = {
                    "weight": T(rows(e["embedding.word.weight"], r * V // tp, V // tp))}
            if spec.get("mcore"):
                model = to_mcore(lm, model.get("word_embeddings_for_head"))
            state = {
                "args": argparse.Namespace(**a, params_dtype=_torch.bfloat16),
                "checkpoint_version": 3.0,
                "iteration": it,
                "model": model,
                "optimizer": {"state": {0: {"exp_avg": tensor("Float", [0.0, 1.0])}}},
                "rng_state": [{"random_rng_state": (3, tuple(range(5)), None),
                               "np_rng_state": ("MT19937", b"\x01\x02", 624, 0, 0.0)}],
            }
            name = "mp_rank_%02d_%03d" % (r, s) if pp > 1 else "mp_rank_%02d" % r
            os.makedirs(os.path.join(it_dir, name), exist_ok=True)
            save(state, os.path.join(it_dir, name, "model_optim_rng.pt"), "model_optim_rng")
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(it))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "megatron":
        megatron(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    if len(sys.argv) >= 3 and sys.argv[1] == "basic":
        protocol = int(sys.argv[3]) if len(sys.argv) > 3 else 2
        save(basic(), sys.argv[2], archive="model_optim_rng", protocol=protocol)
    else:
        sys.exit("usage: torch_save.py basic OUT.pt [PROTOCOL]")
