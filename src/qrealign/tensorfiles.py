"""Named tensors that stay on disk until read, and a safetensors writer that takes them one at a time.

Why: learned rounding stores one int8 per weight, about 69 GB for a 70B model. Held in a dict
until the run is saved (and again when the run is read back for an export), that is host memory
a block-by-block run on one GPU was meant not to need. `TensorFiles` maps each name to the file
it lies in (a block's checkpoint, the finished run) and reads it on access; `save_streaming`
writes the standard safetensors format from such a mapping without holding more than one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

# safetensors' dtype names (the format's specification)
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# safetensors' own order (its Rust `Dtype` enum, smallest first): `save_file` writes the largest
# first, then by name, which aligns every tensor to its element size. The same order here gives
# the same bytes as `save_file` (tested; metadata, which `save_file` orders at random, is sorted).
_RANK = {dtype: rank for rank, dtype in enumerate((torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16,
                                                   torch.bfloat16, torch.int32, torch.float32, torch.float64,
                                                   torch.int64))}


class _OpenFile:
    """One safetensors file held open by its descriptor and read with `pread`: the data of the
    file as it was when opened, even after it is replaced or removed at its path (POSIX keeps an
    open file's data), and a clear error, not a crash, if it is cut short in place (a memory map
    would raise SIGBUS there)."""

    def __init__(self, path: str | Path, fd: int | None = None):
        """`fd`: a descriptor already open on the file (it may be unlinked); this object owns it."""
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY) if fd is None else fd
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if 8 + n > size:
                raise ValueError(f"{self.path}: a header of {n} bytes in a file of {size}")
            self.header = json.loads(os.pread(self.fd, n, 8))
            self.header.pop("__metadata__", None)
            self.base = 8 + n
            for key, entry in self.header.items():
                start, end = entry["data_offsets"]
                if entry["dtype"] not in _DTYPES or not 0 <= start <= end <= size - self.base:
                    raise ValueError(f"{self.path}: tensor {key} lies outside the file or has an unknown dtype")
        except BaseException:
            fd, self.fd = self.fd, None  # closed once: `__del__` must not close the number again
            os.close(fd)
            raise

    def dtype_and_shape(self, key: str) -> tuple[torch.dtype, list[int]]:
        entry = self.header[key]
        return _DTYPES[entry["dtype"]], list(entry["shape"])

    def read(self, key: str) -> torch.Tensor:
        dtype, shape = self.dtype_and_shape(key)
        start, end = self.header[key]["data_offsets"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        data = os.pread(self.fd, end - start, self.base + start)
        if len(data) != end - start:
            raise OSError(f"{self.path} was cut short after it was opened (tensor {key}): it is being rewritten "
                          "in place; read the run again")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def __getstate__(self):
        # a copy would hold the same descriptor number and close it under the original
        raise TypeError(f"a TensorFiles reading {self.path} holds an open file: call to_dict() to copy or pickle it")

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class TensorFiles(Mapping):
    """Named tensors, each held in memory (`update`) or read from the safetensors file it lies in
    (`add_file`) when asked for. A later entry of a name replaces an earlier one.

    A snapshot: each file stays open (`_OpenFile`, nothing read until asked for), so a file a
    later run replaces or removes at the same path (a checkpoint folder used again, an `--out`
    written again) does not change what this mapping reads; the files close when the mapping is
    dropped. Not picklable (it holds open files): `to_dict()` reads everything into memory."""

    def __init__(self, files: tuple = (), tensors: Mapping | None = None):
        self._where: dict[str, _OpenFile] = {}
        self._held: dict[str, torch.Tensor] = {}
        for path in files:
            self.add_file(path)
        if tensors:
            self.update(tensors)

    def add_file(self, path: str | Path) -> None:
        self._add_opened(_OpenFile(path))

    def _add_opened(self, opened: _OpenFile) -> None:
        for key in opened.header:
            self._held.pop(key, None)
            self._where[key] = opened

    def update(self, tensors: Mapping) -> None:
        for key, value in tensors.items():
            self._where.pop(key, None)
            self._held[key] = value

    def spill(self, tensors: Mapping) -> None:
        """Hold `tensors` in a temporary file, not in memory: the file is unlinked as soon as it is
        created and written and read through its descriptor, so the space goes back when the mapping
        is dropped or the process ends, a kill included, and nothing is left behind. For what would
        otherwise sit in host memory twice (learned rounding of a run without a checkpoint). Where:
        the system's temp folder (`TMPDIR`; on a tmpfs that is memory again). A folder that cannot
        take it (full, read-only, no `pread`) keeps them in memory instead, with a warning: the run
        goes on."""
        fd = None
        try:
            if not hasattr(os, "pread"):  # what reads it back (`_OpenFile`) is POSIX only
                raise OSError("no os.pread on this platform")
            fd, path = tempfile.mkstemp(prefix="qrealign-", suffix=".safetensors")
            os.unlink(path)  # from here on only the descriptor holds the file
            with os.fdopen(os.dup(fd), "wb") as f:
                _write_streaming(tensors, f)
            owned, fd = fd, None  # `_OpenFile` owns the descriptor now, and closes it if it fails
            self._add_opened(_OpenFile(path, owned))
        except (OSError, NotImplementedError) as exc:  # NotImplementedError: a big-endian host
            warnings.warn(f"could not hold learned parameters in a temporary file ({exc}); kept in memory "
                          "(set TMPDIR to a folder with room, or pass a checkpoint folder)", stacklevel=2)
            self.update(tensors)
        finally:
            if fd is not None:
                os.close(fd)

    def drop(self, key: str) -> None:
        """Forget `key` (e.g. a file's placeholder entry); no error if it is not there."""
        self._held.pop(key, None)
        self._where.pop(key, None)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        return self._where[key].read(key)  # KeyError for an unknown name, as a dict

    def dtype_and_shape(self, key: str) -> tuple[torch.dtype, list[int]]:
        """Without reading the tensor's data."""
        if key in self._held:
            t = self._held[key]
            return t.dtype, list(t.shape)
        return self._where[key].dtype_and_shape(key)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read into memory (e.g. for `safetensors.torch.save_file` or pickling)."""
        return {key: self[key] for key in self}

    def __iter__(self) -> Iterator[str]:
        yield from self._held
        yield from self._where

    def __len__(self) -> int:
        return len(self._held) + len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._held or key in self._where


def save_streaming(tensors: Mapping, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as one safetensors file, reading (for a `TensorFiles`: loading) one tensor at
    a time. The layout is the format's and `safetensors.torch.save_file`'s: an 8-byte
    little-endian header length, a JSON header of dtype, shape and byte offsets (padded with
    spaces to a multiple of 8), then the tensors' bytes back to back in header order (`_RANK`)."""
    with open(path, "wb") as f:
        _write_streaming(tensors, f, metadata)


def _write_streaming(tensors: Mapping, f, metadata: dict[str, str] | None = None) -> None:
    """`save_streaming` into a binary file object open for writing at its start."""
    if sys.byteorder != "little":  # the format is little-endian; a view of native bytes is not, there
        raise NotImplementedError("save_streaming writes little-endian hosts' bytes only")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps strings to strings")
    info = tensors.dtype_and_shape if isinstance(tensors, TensorFiles) else (
        lambda k: (tensors[k].dtype, list(tensors[k].shape)))
    layout = {name: info(name) for name in tensors}
    names = sorted(layout, key=lambda k: (-_RANK.get(layout[k][0], -1), k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = layout[name]
        if dtype not in _CODES:
            raise TypeError(f"{name}: {dtype} has no safetensors code")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        expected = header[name]["data_offsets"]
        data = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if data.numel() != expected[1] - expected[0]:  # a guard: the header was made from these tensors
            raise ValueError(f"{name}: {data.numel()} bytes, the header says {expected[1] - expected[0]}")
        f.write(data.numpy().data)
