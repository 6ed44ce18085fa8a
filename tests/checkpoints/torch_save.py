"""Writes files in torch.save's zip format with Python's standard library only (no PyTorch), as
test fixtures for checkpoints/torch_file.h and the Megatron-LM checkpoint importer.

torch.save pickles the object (protocol 2) with a persistent id for each storage,
("storage", torch.<Type>Storage, key, location, numel), and tensors as calls of
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks). Here stub
modules named torch and torch._utils stand in for PyTorch, so CPython's own pickler writes the same
opcodes; the zip holds <archive>/data.pkl, <archive>/data/<key>, <archive>/version and
<archive>/byteorder, stored uncompressed, as torch does.

Usage as a script: torch_save.py basic OUT.pt  (the file tests/checkpoints/torch_file_test.cc
reads; its values are spelled out there).
"""
import argparse
import collections
import io
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
    args = argparse.Namespace(num_layers=4, hidden_size=64, swiglu=True, norm="RMSNorm",
                              exit_layer_nums=[2, 3], params_dtype=_torch.bfloat16,
                              lr=1.5e-4, nothing=None)
    return {
        "args": args,
        "iteration": 1000,
        "model": {"language_model": state},
        "misc": {"big": 2**70, "neg": -300, "bytes": b"\x00\xff\x10", "tuple": (1, "two", 3.5),
                 "set": {7}, "nested": [[1, 2], [3]], "shared": [shared, shared],
                 "unicode": "h\u00e9\u4e16", "false": False},
    }


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "basic":
        protocol = int(sys.argv[3]) if len(sys.argv) > 3 else 2
        save(basic(), sys.argv[2], archive="model_optim_rng", protocol=protocol)
    else:
        sys.exit("usage: torch_save.py basic OUT.pt [PROTOCOL]")
