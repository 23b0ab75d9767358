"""Small shared helpers: devices, dtypes, seeds, fingerprints, atomic writes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import QrealignError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks the best accelerator present; anything else must name a device this
    machine has (checked here, so a typo or a missing GPU fails before a model is loaded)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QrealignError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise QrealignError(f"device {device!r}: this torch build or machine has no usable CUDA device "
                                "(use --device cpu, or install a CUDA build of torch)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise QrealignError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type == "mps" and not _mps_available():
        raise QrealignError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are one device when either leaves the index open (as resolve_device does)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (pads get 0): left and right padding
    then give the same RoPE angles to the same tokens, as unpadded prompts have."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def kv_cache_argument(model) -> str:
    """The name a model's forward takes (and returns) its KV cache under: transformers renamed
    `past_key_values` to `cache` within 5.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise QrealignError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'") from None


def available_memory() -> int | None:
    """Bytes of RAM the kernel says a new allocation can get without swapping (Linux
    `MemAvailable`), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sha256_json(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


FINGERPRINT_VERSION = 2  # 1: float64 sum, which moved with the thread count (and the device)


def tensor_digest(tensor: torch.Tensor, h: "hashlib._Hash", max_elems: int = 65536, version: int = FINGERPRINT_VERSION
                  ) -> None:
    """Feed a tensor's shape, dtype, a strided sample of its values and a checksum of all of them
    into a hash: cheap on 70B checkpoints, and any real weight change (fine-tune, quantization)
    still shows. The checksum adds the raw bits as integers (mod 2**64), so, unlike a float sum,
    it is the same for any thread count and on any device."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // max_elems)
    sample = flat[::step].to("cpu", torch.float32).contiguous()
    h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    h.update(sample.numpy().tobytes())
    if version == 1:
        h.update(np.float64(flat.to(torch.float64).sum().item()).tobytes())
    else:
        h.update(_bit_checksum(flat).to_bytes(8, "little"))


def params_digest(tensors: dict[str, torch.Tensor], length: int = 16) -> str:
    """A hash of every byte of named tensors (e.g. a calibration's learned parameters), as float32:
    whether two runs produced exactly the same numbers. Unlike `tensor_digest`, not sampled."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


def _bit_checksum(flat: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Sum of the elements' bit patterns as integers, mod 2**64 (integer addition does not
    depend on the order of a parallel reduction). Chunked: no 8-byte copy of a whole tensor."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.contiguous().view(as_int)
    return sum(int(part.to(torch.int64).sum().item()) for part in bits.split(chunk)) % (1 << 64)


def model_fingerprint(model: torch.nn.Module, length: int = 16, version: int = FINGERPRINT_VERSION) -> str:
    """A hash of the model's type and state dict. A disk-offloaded model gives the same value as
    the same checkpoint loaded in memory (its blocks are read from the files one tensor at a
    time, once), so runs resume and reload across the two."""
    from .models.offload import offloaded

    source = offloaded(model)
    if source is None:
        return _state_fingerprint(model, model.state_dict().items(), length, version)
    if (length, version) not in source.fingerprints:
        source.fingerprints[length, version] = _state_fingerprint(model, source.state_items(), length, version)
    return source.fingerprints[length, version]


def fingerprint_matches(model: torch.nn.Module, expected: str, meta: dict) -> bool:
    """Whether `model` is the one a run recorded as `expected`. Runs written before
    FINGERPRINT_VERSION 2 hold a value that depended on the thread count: accept it as computed
    with this process's thread count or with one thread (the demo's worker lanes)."""
    if model_fingerprint(model, len(expected)) == expected:
        return True
    if meta.get("fingerprint_version", 1) != 1:
        return False
    threads = torch.get_num_threads()
    try:
        for n in dict.fromkeys((threads, 1)):
            torch.set_num_threads(n)
            if model_fingerprint(model, len(expected), version=1) == expected:
                return True
    finally:
        torch.set_num_threads(threads)
    return False


def _state_fingerprint(model: torch.nn.Module, items, length: int, version: int = FINGERPRINT_VERSION) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(str(getattr(config, "model_type", "")).encode())
    for name, tensor in items:
        h.update(name.encode())
        tensor_digest(tensor, h, version=version)
    return h.hexdigest()[:length]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees a half-written file."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_user_text(path: str | Path, flag: str) -> str:
    """A text file a user named on the command line (UTF-8), or a one-line error naming the flag."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QrealignError(f"cannot read {flag} {path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise QrealignError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (a temporary sibling, then `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give it a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file` with a normal file's mode: it creates the file 0600, so another
    user or a serving container could not read a run, probes or an export shard. Tensors that lie
    on disk (`tensorfiles.TensorFiles`) are written one at a time instead of loaded all at once."""
    from safetensors.torch import save_file

    from .tensorfiles import TensorFiles, save_streaming

    if isinstance(tensors, TensorFiles):
        save_streaming(tensors, path, metadata)
    else:
        save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_marker(folder: str | Path, name: str = "qrealign.json") -> dict | None:
    """A folder's JSON marker (what qrealign wrote there: its "kind" and facts), or None where it
    has none or it is unreadable: for messages that describe a folder, never for a decision."""
    try:
        meta = read_json(Path(folder) / name)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_out_dir(out_dir: str | Path, marker: str, kind: str | None = None,
                  what: str = "an earlier output of this command", error: type = QrealignError,
                  same: dict[str, tuple] | None = None) -> None:
    """Refuse an `--out` whose contents a write would destroy.

    Outputs replace their directory wholesale, so an existing directory is accepted only when it
    is empty or is an earlier output of the same command: it holds `marker` (and, with `kind`,
    `marker` is a JSON file whose "kind" is `kind`, and with `same`, whose fields hold one of the
    given values: an `attack` output is no earlier `align` output, a `realign` run no `quantize`
    run). `--out` pointing at a model, a run or a home folder must fail before any work, not
    delete it after."""
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    if out_dir.name in ("", ".", "..") or resolved == Path.cwd() or resolved in Path.cwd().parents:
        # The output replaces its directory by a rename: not possible (or wanted) for the working
        # directory or one above it, and `Path(".")` has no name to build the sibling from.
        raise error(f"--out {out_dir} is the working directory or one above it; choose a new sub-directory")
    _check_writable_parent(out_dir, error)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise error(f"--out {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    found = out_dir / marker
    if found.is_file():
        if kind is None:
            return
        try:
            meta = read_json(found)
            if meta.get("kind") == kind:
                other = {k: meta.get(k) for k, allowed in (same or {}).items() if meta.get(k) not in allowed}
                if not other:
                    return
                shown = ", ".join(f"{k} {v!r}" for k, v in other.items())
                raise error(f"--out {out_dir} holds the output of another command ({kind}, {shown}); choose a new "
                            "directory: its contents would be replaced")
        except (OSError, ValueError, AttributeError):
            pass
    missing = f"{marker} of kind {kind!r}" if kind else marker
    raise error(f"--out {out_dir} exists and is not {what} (no {missing}); choose a new directory: "
                "its contents would be replaced")


def _check_writable_parent(out_dir: Path, error: type) -> None:
    """The output is built in a temporary sibling: its folder (or the nearest one that exists, the
    rest is created) must be a directory we can create entries in. Tried, not guessed from
    permission bits (root passes those, and /proc or a read-only mount still refuse)."""
    parent = out_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"--out {out_dir}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(dir=parent, prefix=".qrealign-write-check-")
    except OSError as exc:
        raise error(f"--out {out_dir}: cannot write in {parent} ({exc.strerror or exc})") from None
    os.rmdir(probe)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True, marker: str | None = None,
               kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; move it into place only if the block succeeds.

    An error (or Ctrl-C) leaves no partial output: either the old directory or the new one.
    With `marker`, an existing directory is replaced only if `check_out_dir` accepts it."""
    final = Path(final)
    if marker is not None:
        check_out_dir(final, marker, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{_owner_tag()}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; the final directory is a normal one
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise QrealignError(f"{final} already exists")
            # a fresh empty name (rename replaces an empty directory): a leftover of an earlier
            # process with the same pid cannot block the swap
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{_owner_tag()}-"))
            try:
                os.replace(final, old)
            except BaseException:
                old.rmdir()  # still the empty placeholder
                raise
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the earlier output goes back, not into a hidden orphan
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _host() -> str:
    import socket

    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _remove_orphans(final: Path) -> None:
    """Temporary siblings of `final` left by processes of this host that no longer run: a
    SIGKILL, the OOM killer or a terminated demo lane skips the cleanup above. Another host's
    (a shared filesystem) and a running process's are left alone."""
    _remove_dead_builds(final.parent, re.escape(final.name), f".{glob.escape(final.name)}.*")


def remove_orphans_under(folder: Path) -> list[str]:
    """`_remove_orphans` for every output in `folder`: the leftovers of a build whose key no later
    run asks for again (a setting changed after a lane was terminated mid-build) would otherwise
    stay for good, and on a large model each is model-sized (review 68). Returns what it removed."""
    folder = Path(folder)
    return _remove_dead_builds(folder, ".+", ".*") if folder.is_dir() else []


def _remove_dead_builds(folder: Path, name: str, candidates: str) -> list[str]:
    """Remove `atomic_dir`'s temporary folders in `folder` (of outputs matching the regex `name`;
    `candidates` a glob that narrows the listing) whose process of this host is gone."""
    pattern = re.compile(rf"\.{name}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-[^/]*")
    removed = []
    for path in folder.glob(candidates):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report(out: str | Path, stem: str, report: dict, markdown: str) -> None:
    """A benchmark's two files: `<stem>.json` (the numbers) and `<stem>.md` (the table), next to
    other benchmarks' files, never inside a model or a qrealign output."""
    out = check_report_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", markdown)


def check_report_dir(out: str | Path) -> Path:
    """A benchmark's folder must be a folder that holds no model or qrealign output: checked before
    the benchmark runs (minutes to hours), and again when it writes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QrealignError(f"--out {out} is a file: choose a benchmark directory")
    owner = next((f for f in ("config.json", "qrealign.json", "result.json") if (out / f).is_file()), None)
    if owner:
        raise QrealignError(f"--out {out} is a model or qrealign output ({owner}): choose a benchmark directory")
    return out
