"""Disk-offloaded decoder blocks: calibrate a model larger than CPU RAM.

`load_model(dir, offload="disk")` builds the model with its parameters on the meta device,
materialises only what lives outside the decoder blocks (embeddings, final norm, LM head) and
attaches a `DiskBlocks` to the model. The calibration engine already works on one block at a
time, so it asks the `DiskBlocks` to read block i's tensors from the safetensors files
(`onload`) and to drop them again (`release`) once the block's learned parameters are recorded.

Probe capture and the first-token teacher targets run block-major the same way
(`calibrate/capture.run_blocks`); the first-token tail keeps its own copies of the
blocks it needs (`DiskBlocks.copy_of`). Anything that needs all blocks at every step (generation,
evaluation) cannot run on such a model; its forward pass raises `OffloadUnsupported`, except
inside `streaming_blocks`, which loads each block for the duration of its own forward call.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, QrealignError
from .registry import get_arch, get_blocks

ATTR = "qrealign_offload"  # the model attribute holding its DiskBlocks


class OffloadUnsupported(QrealignError):
    """An operation needs every block in memory, and the model's blocks live on disk."""


def offloaded(model: nn.Module) -> "DiskBlocks | None":
    return getattr(model, ATTR, None)


def require_resident(model: nn.Module, what: str) -> None:
    """Raise a clear error before `what` runs into meta tensors."""
    if offloaded(model) is not None:
        raise OffloadUnsupported(f"{what} needs every decoder block in memory; offload='disk' does not support it "
                                 "(load the model without offload)")


class DiskBlocks:
    """Reads one decoder block at a time from a model directory's safetensors files.

    Block tensors are cast to the dtype the model was loaded in first (what `load_model` without
    offload stores), then to the requested dtype, so calibration sees the same values either way."""

    def __init__(self, model: nn.Module, key_files: dict[str, Path]):
        self.model = model
        self.key_files = key_files
        prefix = get_arch(model).layers + "."
        self.names: list[list[str]] = [[] for _ in get_blocks(model)]
        # each block tensor's load dtype, recorded once: a block onloaded in float32 and released
        # keeps float32 meta tensors, and a later read must still round through the load dtype
        self.load_dtype: dict[str, torch.dtype] = {}
        for name, tensor in model.state_dict().items():  # one pass: a 70B state dict has thousands of entries
            if name.startswith(prefix):
                self.names[int(name[len(prefix):].split(".", 1)[0])].append(name)
                self.load_dtype[name] = tensor.dtype
        self.prefix = prefix
        self.resident: set[int] = set()
        self.max_resident = 0
        self.onloads = 0
        self.fingerprints: dict[tuple, str] = {}  # model_fingerprint reads the checkpoint once
        self._streaming = False

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor of the checkpoint, as `load_model` would hold it (in `dtype`)."""
        from safetensors import safe_open

        file = self.key_files.get(name)
        if file is None:
            raise ModelLoadError(f"{name} is not in the checkpoint's safetensors files")
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name).to(dtype)

    def onload(self, i: int, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
        """Materialise block i on `device` (in `dtype`, default the load dtype)."""
        for name in self.names[i]:
            load = self.load_dtype[name]
            _put(self.model, name, lambda old, name=name, load=load: self.read(name, load).to(device, dtype or load))
        self.resident.add(i)
        self.onloads += 1
        self.max_resident = max(self.max_resident, len(self.resident))
        return get_blocks(self.model)[i]

    def copy_of(self, i: int, device: torch.device | str) -> nn.Module:
        """A separate module holding block i's checkpoint weights (in the load dtype) on `device`:
        for work that needs FP blocks while the engine turns the model's own ones into quantized
        blocks and drops them (the first-token objective's tail)."""
        import copy

        block = copy.deepcopy(get_blocks(self.model)[i])  # on meta: copies structure, no data
        prefix = f"{self.prefix}{i}."
        for name in self.names[i]:
            _put(block, name[len(prefix):], lambda old, name=name: self.read(name, self.load_dtype[name]).to(device))
        return block

    def release(self, i: int) -> None:
        """Drop block i's tensors (whatever the engine turned it into) back to the meta device."""
        get_blocks(self.model)[i].to("meta")
        self.resident.discard(i)
        return_freed_memory()

    def state_items(self):
        """(name, tensor) in `model.state_dict()` order, block tensors read from disk one by one."""
        for name, tensor in self.model.state_dict().items():
            yield name, (self.read(name, self.load_dtype.get(name, tensor.dtype)) if tensor.device.type == "meta"
                         else tensor)

    @contextlib.contextmanager
    def streaming(self, device: torch.device | str):
        """Let the model's forward run, loading each block on `device` for its own call only."""
        blocks = get_blocks(self.model)
        handles = []
        for i, block in enumerate(blocks):
            def load(module, args, i=i):
                self.onload(i, device)

            handles.append(block.register_forward_pre_hook(load))
            handles.append(block.register_forward_hook(lambda module, args, out, i=i: self.release(i)))
        self._streaming = True
        try:
            yield
        finally:
            self._streaming = False
            for h in handles:
                h.remove()
            for i in list(self.resident):
                self.release(i)

    def _guard(self, module, args):
        if not self._streaming:
            require_resident(self.model, "a forward pass of the whole model (generation, evaluation)")


def return_freed_memory() -> None:
    """Hand the freed block back to the OS: glibc keeps freed heap pages, and the process grew by
    about one block per block without this. One thread, random Llamas: streamed export (142M
    parameters) peak RSS 1.20 -> 0.75 GiB; offloaded calibration (16 blocks of width 1024, 0.8 GB
    of fp32 weights, 8 prompts) RTN 1.15 -> 0.93 GiB, OmniQuant 1.73 -> 1.14 GiB. Without glibc
    it does nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def streaming_blocks(model: nn.Module, device: torch.device | str):
    """`DiskBlocks.streaming` for an offloaded model, nothing otherwise."""
    source = offloaded(model)
    return source.streaming(device) if source is not None else contextlib.nullcontext()


def load_offloaded(path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> nn.Module:
    """The model of a local safetensors directory with every decoder block left on disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ModelLoadError(f"{directory} is a quantized checkpoint; offload='disk' needs plain safetensors weights")
    key_files = _key_files(directory)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not read
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _check_shapes(model, key_files, directory)
    source = DiskBlocks(model, key_files)
    block_names = {n for names in source.names for n in names}
    with torch.no_grad():
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            if name not in block_names and param.device.type == "meta" and name in key_files:
                _put(model, name, lambda old, name=name: source.read(name, old.dtype).to(device))
        model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.device.type == "meta" and n not in block_names]
    missing += [n for n in block_names if n not in key_files]
    if missing:
        raise ModelLoadError(f"{directory}: the safetensors files lack {sorted(missing)[:3]} "
                             f"({len(missing)} tensors); offload='disk' needs the model's own tensor names")
    _load_generation_config(model, directory)
    setattr(model, ATTR, source)
    model.register_forward_pre_hook(source._guard)
    return model


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """The directory's generation_config.json, as `from_pretrained` reads it (`from_config` only
    derives one from config.json): a re-saved or exported model keeps its sampling defaults."""
    from transformers import GenerationConfig

    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)


def _check_shapes(model: nn.Module, key_files: dict[str, Path], directory: Path) -> None:
    """Every checkpoint tensor the model holds has the shape its config gives it, read from the
    safetensors headers before any block is loaded. The in-memory load refuses a mismatch; an
    offloaded run would otherwise calibrate the file's shapes under a config that says otherwise,
    and the export would describe tensors it does not hold."""
    from safetensors import safe_open

    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    wrong = []
    for file in sorted(set(key_files.values())):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape()) if name in expected else None
                if shape is not None and shape != expected[name]:
                    wrong.append(f"{name} {shape} vs {expected[name]}")
    if wrong:
        raise ModelLoadError(f"{directory}: {len(wrong)} tensors do not have the shape config.json gives them "
                             f"(checkpoint vs config: {'; '.join(wrong[:3])})")


def _put(root: nn.Module, name: str, make) -> None:
    """Replace the parameter or buffer `name` by `make(current)`: a new tensor, not a copy into
    the meta one (meta tensors have no storage to copy into)."""
    module_path, attr = name.rpartition(".")[::2]
    module = root.get_submodule(module_path)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        module._parameters[attr] = nn.Parameter(make(old), requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = make(old)


def _key_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (the shard index if there is one)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / f for k, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors files; offload='disk' reads only safetensors")
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: file for k in handle.keys()})
    return out
