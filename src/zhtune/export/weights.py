"""Streaming safetensors I/O: read an HF model folder's tensors one at a time and write sharded safetensors
with every header known before the first tensor, so no model is ever whole in memory (merge, convert meta,
export gguf, and the config/weights check in model/load.py read through it).

Safetensors files are read with positioned file reads (an mmap would count every page it touched as
resident memory); .bin files one shard at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, _ST_DTYPES[code])


def _st_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return next(k for k, v in _ST_DTYPES.items() if v == name)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header json, byte offset of the data) of a .safetensors file that holds every byte its header
    promises (a truncated shard is named before a merge or an export starts, not halfway through)."""
    from zhtune.io import check_safetensors

    header = check_safetensors(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return header, 8 + n


@dataclass
class TensorSpec:
    """One output tensor: its name, shape and dtype are fixed before any data is written."""
    name: str
    shape: tuple[int, ...]
    dtype: Any            # torch.dtype
    source: Any = None    # whatever the producer needs to build it

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class WeightReader:
    """The tensors of an HF model folder (model.safetensors[.index.json] or pytorch_model*.bin), one at a time."""

    def __init__(self, model_dir: str | Path, files: list[Path] | None = None):
        self.dir = Path(model_dir)
        self._where: dict[str, tuple[Path, Any]] = {}   # name -> (file, header entry | None)
        self._cache: tuple[Path | None, dict] = (None, {})
        files = files or self._files()
        for f in files:
            if f.suffix == ".safetensors":
                header, start = read_safetensors_header(f)
                for name, entry in header.items():
                    if name != "__metadata__":
                        self._where[name] = (f, dict(entry, start=start))
            else:  # .bin: read the shapes from an mmapped load (data pages are not touched)
                from zhtune.io import load_state_dict

                for name, t in load_state_dict(f).items():
                    self._where[name] = (f, {"shape": list(t.shape), "dtype": _st_code(t.dtype)})

    def _files(self) -> list[Path]:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (self.dir / index).is_file():
                from zhtune.io import read_json

                weight_map = read_json(self.dir / index, index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ZhtuneError(f"{index} has no weight_map", where=str(self.dir / index),
                                      expected='{"weight_map": {tensor name: shard file}}')
                names = list(dict.fromkeys(str(v) for v in weight_map.values()))
                missing = [n for n in names if not (self.dir / n).is_file()]
                if missing:
                    raise ZhtuneError(f"shard {missing[0]} listed in {index} is missing", where=str(self.dir / index),
                                      expected="every shard of the index beside it")
                return [self.dir / n for n in names]
            if (self.dir / single).is_file():
                return [self.dir / single]
        raise ZhtuneError(f"no model weights in {self.dir}", where=str(self.dir),
                          expected="model.safetensors, model.safetensors.index.json or pytorch_model*.bin")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str):
        return _torch_dtype(self._where[name][1]["dtype"])

    def file(self, name: str) -> Path:
        return self._where[name][0]

    def get(self, name: str):
        """The tensor `name` (a fresh CPU tensor)."""
        import torch

        path, entry = self._where[name]
        if path.suffix == ".safetensors":
            begin, end = entry["data_offsets"]
            buf = bytearray(end - begin)
            with open(path, "rb") as fh:
                fh.seek(entry["start"] + begin)
                if fh.readinto(buf) != len(buf):
                    raise ZhtuneError(f"{path} is truncated (tensor {name})", where=str(path))
            if not buf:
                return torch.empty(entry["shape"], dtype=self.dtype(name))
            return torch.frombuffer(buf, dtype=self.dtype(name)).view(entry["shape"])
        if self._cache[0] != path:  # one .bin shard at a time
            from zhtune.io import load_state_dict

            self._cache = (None, {})
            self._cache = (path, load_state_dict(path))
        return self._cache[1][name]


def write_sharded_safetensors(out_dir: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], Any],
                              max_shard_size: int, prefix: str = "model") -> dict[str, str]:
    """Write `specs` as safetensors shards (+ index when more than one), calling make(spec) per tensor.

    Headers are written first from the specs, then each tensor's bytes as it is made: only one
    tensor is in memory at a time. Returns the weight map {name: file}.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in shard:
            header[spec.name] = {"dtype": _st_code(spec.dtype), "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
        with open(out_dir / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for spec in shard:
                t = make(spec)
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise RuntimeError(f"{spec.name}: made {tuple(t.shape)} {t.dtype}, "
                                       f"planned {spec.shape} {spec.dtype}")
                if spec.nbytes:
                    fh.write(t.contiguous().view(-1).view(_u8()).numpy().data)
                weight_map[spec.name] = fname
    if n > 1:
        total = sum(s.nbytes for s in specs)
        (out_dir / f"{prefix}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8")
    return weight_map


def _u8():
    import torch

    return torch.uint8
