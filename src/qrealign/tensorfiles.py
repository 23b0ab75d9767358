"""Named tensors that stay on disk until read, and a safetensors writer that takes them one at a time.

Why: learned rounding stores one int8 per weight, about 69 GB for a 70B model. Held in a dict
until the run is saved (and again when the run is read back for an export), that is host memory
a block-by-block run on one GPU was meant not to need. `TensorFiles` maps each name to the file
it lies in (a block's checkpoint, the finished run) and reads it on access; `save_streaming`
writes the standard safetensors format from such a mapping without holding more than one tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

# safetensors' dtype names (the format's specification)
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


class TensorFiles(Mapping):
    """Named tensors, each held in memory (`update`) or read from the safetensors file it lies in
    (`add_file`) when asked for. A later entry of a name replaces an earlier one."""

    def __init__(self, files: tuple = (), tensors: Mapping | None = None):
        self._where: dict[str, Path] = {}
        self._held: dict[str, torch.Tensor] = {}
        for path in files:
            self.add_file(path)
        if tensors:
            self.update(tensors)

    def add_file(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                self._held.pop(key, None)
                self._where[key] = path

    def update(self, tensors: Mapping) -> None:
        for key, value in tensors.items():
            self._where.pop(key, None)
            self._held[key] = value

    def drop(self, key: str) -> None:
        """Forget `key` (e.g. a file's placeholder entry); no error if it is not there."""
        self._held.pop(key, None)
        self._where.pop(key, None)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        from safetensors import safe_open

        path = self._where[key]  # KeyError for an unknown name, as a dict
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    def dtype_and_shape(self, key: str) -> tuple[torch.dtype, list[int]]:
        """Without reading the tensor's data."""
        if key in self._held:
            t = self._held[key]
            return t.dtype, list(t.shape)
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as handle:
            part = handle.get_slice(key)
            return _DTYPES[part.get_dtype()], list(part.get_shape())

    def __iter__(self) -> Iterator[str]:
        yield from self._held
        yield from self._where

    def __len__(self) -> int:
        return len(self._held) + len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._held or key in self._where


def save_streaming(tensors: Mapping, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as one safetensors file, reading (for a `TensorFiles`: loading) one tensor at
    a time. The layout is the format's: an 8-byte little-endian header length, a JSON header of
    dtype, shape and byte offsets (padded with spaces to a multiple of 8), then the tensors' bytes
    back to back in header order (sorted by name). Readers (safetensors, vLLM) see no difference
    from `safetensors.torch.save_file`'s output but the order."""
    names = sorted(tensors)
    info = tensors.dtype_and_shape if isinstance(tensors, TensorFiles) else (
        lambda k: (tensors[k].dtype, list(tensors[k].shape)))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = info(name)
        if dtype not in _CODES:
            raise TypeError(f"{name}: {dtype} has no safetensors code")
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            expected = header[name]["data_offsets"]
            data = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            if data.numel() != expected[1] - expected[0]:  # a file that changed under a TensorFiles
                raise ValueError(f"{name}: {data.numel()} bytes, the header says {expected[1] - expected[0]}")
            f.write(data.numpy().data)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
