"""Safetensors read from the header and written as a stream: the base model's tensors one
at a time at the offsets its headers give, and output shards whose headers are known before
any tensor is written, so peak memory stays a few tensors whatever the model size."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..builtin import MARKER as BUILTIN_MARKER
from .common import DTYPE_NAMES, WEIGHTS_INDEX, ExportError


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class BaseCheckpoint:
    directory: str
    config: dict
    tensors: dict[str, TensorInfo]    # in file order, then key order within a file

    @classmethod
    def open(cls, directory: str) -> "BaseCheckpoint":
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise ExportError(f"base model {directory}: no config.json; not a transformers model folder")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("quantization_config"):
            raise ExportError(f"base model {directory} is quantized ({config['quantization_config'].get('quant_method')}); "
                              "merge into the unquantized base (--base PATH)")
        index = os.path.join(directory, WEIGHTS_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ExportError(f"base model {directory}: no model.safetensors or {WEIGHTS_INDEX} (a pytorch_model.bin "
                              "checkpoint must be converted to safetensors first)")
        tensors = {}
        for name in files:
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ExportError(f"base model {directory}: {key} is {dtype}; only unquantized checkpoints can be merged")
                    tensors[key] = TensorInfo(name, tuple(piece.get_shape()), SAFETENSORS_DTYPES[dtype])
        return cls(directory, config, tensors)

    @property
    def name(self) -> str:
        """The base's hub name where known (the built-in conversion records it), else its folder."""
        marker = os.path.join(self.directory, BUILTIN_MARKER)
        if os.path.isfile(marker):
            with open(marker) as f:
                return json.load(f).get("hub_name", self.directory)
        return self.directory

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ExportError(f"base model {self.directory} has no tensor {key}")
        return self.tensors[key].shape

    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's, else its first floating tensor's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        by_name = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if name in by_name:
            return by_name[name]
        floating = [i.dtype for i in self.tensors.values() if i.dtype.is_floating_point]
        return floating[0] if floating and floating[0] in DTYPE_NAMES else torch.float32


class BaseReader:
    """Base tensors one at a time, with plain reads at the offsets the header gives.

    Not safe_open: it memory-maps the file, and every page a read touches stays in this
    process's resident set until the file is closed (measured: a 538 MB base file became
    538 MB of RSS). A read() copies one tensor into memory the tensor owns; the page cache
    holds the rest, outside the process.
    """

    def __init__(self, base: BaseCheckpoint):
        self.base, self.headers = base, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.headers.clear()

    def read(self, key: str) -> torch.Tensor:
        info = self.base.tensors[key]
        path = os.path.join(self.base.directory, info.file)
        if info.file not in self.headers:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self.headers[info.file] = (json.loads(f.read(length)), 8 + length)
        header, data_start = self.headers[info.file]
        begin, end = header[key]["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ExportError(f"{path}: truncated at {key}")
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


class SafetensorsStreamWriter:
    """A .safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets)
    is known in advance, so no shard is ever held in memory. The format: 8-byte little-endian
    header length, the JSON header (space-padded to 8 bytes), then the tensors' bytes back to
    back in header order. Tensors must be written in the order of `specs`; all of them."""

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.path, self.header, self.keys, self.written = path, header, [s[0] for s in specs], 0

    def __enter__(self):
        if sys.byteorder != "little":
            raise ExportError("safetensors is little-endian; this writer supports little-endian machines only")
        text = json.dumps(self.header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.header[key]
        if self.written >= len(self.keys) or key != self.keys[self.written]:
            raise ExportError(f"{self.path}: {key} written out of order")
        if list(tensor.shape) != spec["shape"] or SAFETENSORS_NAMES[tensor.dtype] != spec["dtype"]:
            raise ExportError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, declared {spec['dtype']} {spec['shape']}")
        data = tensor.contiguous().reshape(-1)
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.written += 1

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None and self.written != len(self.keys):
            raise ExportError(f"{self.path}: {len(self.keys) - self.written} declared tensors were never written")
