"""One entry point for every model source a user has.

`load_model("smollm2-135m")`, `load_model("./my-finetune")`, `load_model("model.gguf")`,
`load_model("org/name")` (hub, needs network), and `adapter=` for a base model plus a PEFT
adapter, merged on load. Inputs are validated before anything heavy happens, and problems come
back as one-line `ModelLoadError`s.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedArchitecture
from ..utils import resolve_device, resolve_dtype
from .embedded import EMBEDDED, embedded_dir
from .registry import get_arch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "dir" | "gguf" | "hub"
    path: str  # directory, hub id, or directory holding the gguf file
    gguf_file: str | None = None
    name: str = ""  # what the user typed

    def describe(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def reload_spec(self) -> str:
        """What to pass to `load_model` later, from any working directory."""
        if self.kind in ("embedded", "hub"):
            return self.name
        if self.kind == "gguf":
            return str((Path(self.path) / self.gguf_file).resolve())
        return str(Path(self.path).resolve())


def resolve_source(source: str | Path) -> ModelSource:
    """Decide what kind of source a string names, and check it looks loadable."""
    name = str(source)
    if name in EMBEDDED:
        return ModelSource("embedded", str(embedded_dir(name)), name=name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file")
            _check_gguf(path)
            return ModelSource("gguf", str(path.parent), gguf_file=path.name, name=name)
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                _check_gguf(ggufs[0])
                return ModelSource("gguf", str(path), gguf_file=ggufs[0].name, name=name)
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory{_what_it_is(path)}")
        _check_config(path / "config.json")
        _check_safetensors(path)
        return ModelSource("dir", str(path), name=name)
    if looks_like_path(name):
        hint = ""
        if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
            hint = (f" (read as a local path because ./{name.split('/', 1)[0]} is a folder here; for the hub id "
                    "run from another directory)")
        raise ModelLoadError(f"model path {name} does not exist{hint}")
    if _HUB_ID.match(name):
        return ModelSource("hub", name, name=name)
    raise ModelLoadError(
        f"{name!r} is not an existing path, a hub id (org/name) or an embedded model ({', '.join(EMBEDDED)})"
    )


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local path rather than a hub id ("org/name"). "runs/attackd" has the
    shape of a hub id, but when "runs" is a local folder it is a mistyped path: say so instead of
    sending it to the hub (a hub lookup without network retries for half a minute)."""
    if name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors")) or name.count("/") > 1:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir()


def _check_config(config_path: Path) -> None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    try:
        get_arch(type("Config", (), {"model_type": model_type}))
    except UnsupportedArchitecture as exc:
        raise UnsupportedArchitecture(f"{config_path.parent}: {exc}") from None


def _read_config(src: ModelSource, trust_remote_code: bool):
    """The model's config alone (no weight read or downloaded), its architecture checked."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {src.name}: {str(exc).splitlines()[0]}") from None
    try:
        get_arch(config)
    except UnsupportedArchitecture as exc:
        raise UnsupportedArchitecture(f"{src.name}: {exc}") from None
    return config


def _compressed_checkpoint(src: ModelSource, hub_config=None):
    """The checkpoint's engine-arithmetic runtime (`export.runtime`), or None: read from a local
    directory's config.json, or from the hub config `_read_config` fetched (the same files give
    the same evaluation wherever they are stored)."""
    from ..export.runtime import CompressedTensorsCheckpoint

    if src.kind == "dir":
        return CompressedTensorsCheckpoint.detect(src.path)
    if hub_config is not None and not src.gguf_file:
        return CompressedTensorsCheckpoint.from_config(hub_config.to_dict())
    return None


def _check_safetensors(directory: Path) -> None:
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error type for every corruption
            raise ModelLoadError(f"{file} is corrupt or truncated ({exc})") from None


def _check_gguf(file: Path) -> None:
    with open(file, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{file} is not a GGUF file (bad magic {magic!r})")
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
        arch = reader.fields.get("general.architecture")
        arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None
    except Exception as exc:
        raise ModelLoadError(f"{file} is corrupt or truncated ({exc})") from None
    if arch_name is not None and arch_name not in _GGUF_ARCH_TO_MODEL_TYPE:
        raise UnsupportedArchitecture(
            f"{file}: GGUF architecture {arch_name!r} is not supported; supported: {sorted(_GGUF_ARCH_TO_MODEL_TYPE)}"
        )


_GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                            "gemma2": "gemma2", "gemma3": "gemma3_text"}


# The files a Hugging Face tokenizer loads from (fast, sentencepiece, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# What a qrealign output folder is, by its qrealign.json "kind", and what reads it.
_OUTPUT_KINDS = {
    "quantized": "a quantization run (its parameters only): load it with qrealign.calibrate.load_quantized; "
                 "eval, export, analyze and inspect take it on the command line",
    "probes": "a probe set: realign --probes and analyze --probes take it",
    "eval": "an evaluation: report takes it, and eval --rejudge judges its answers again",
    "teacher-targets": "a teacher pass: realign --teacher takes it (for the calibration it was computed on)",
}


def _what_it_is(path: Path) -> str:
    """For a folder qrealign wrote that is not a model: what it is and what reads it."""
    from ..utils import read_marker

    kind = (read_marker(path) or {}).get("kind") or ("eval" if (path / "result.json").is_file() else None)
    return f"; it is {_OUTPUT_KINDS[kind]}" if kind in _OUTPUT_KINDS else ""


def load_tokenizer(source: str | Path | ModelSource, padding_side: str = "left"):
    from transformers import AutoTokenizer

    src = source if isinstance(source, ModelSource) else resolve_source(source)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a directory without tokenizer files
        folder = Path(src.path)
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        if folder.is_dir() and not src.gguf_file and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(f"cannot load tokenizer for {src.name}: the folder has none of "
                                 f"{', '.join(TOKENIZER_FILES)}; save the tokenizer beside the weights "
                                 f"(tokenizer.save_pretrained(DIR)) (transformers: {said})") from None
        raise ModelLoadError(f"cannot load tokenizer for {src.name}: {said}") from None
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    padding_side: str = "left",
    offload: str | None = None,
):
    """Load `(model, tokenizer)` from any supported source.

    The model stays on `device` (CPU by default: the calibration engine onloads one block at a
    time to the compute device, so a 70B model never has to fit on the GPU). `offload="disk"`
    leaves the decoder blocks in the safetensors files too (models larger than CPU RAM; only
    calibration can use such a model, see `models.offload`)."""
    from transformers import AutoModelForCausalLM

    src = resolve_source(source)
    target = resolve_device(device)  # a missing GPU fails before gigabytes are read
    if offload is not None:  # (reads a local snapshot's config itself)
        model = _load_offloaded(src, adapter, offload, resolve_dtype(dtype), target, trust_remote_code)
        return _finish(model, src, None, padding_side)
    if adapter is not None:
        check_adapter_dir(adapter)  # ... and so does a mistyped adapter path
    hub_config = _read_config(src, trust_remote_code) if src.kind == "hub" else None  # config first, no weight
    kwargs: dict = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    # a qrealign export or another compressed-tensors checkpoint, local or on the hub: run it as engines do
    compressed = _compressed_checkpoint(src, hub_config)
    if compressed is not None:
        from ..export.plan import require_compressed_tensors

        require_compressed_tensors(f"cannot load model {src.name} (a compressed-tensors checkpoint)", ModelLoadError)
        kwargs.update(compressed.load_kwargs())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {src.name}: {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc):  # transformers' size-mismatch refusal; anything else is a bug
            raise
        raise ModelLoadError(f"cannot load model {src.name}: its tensors' shapes do not match its config.json "
                             "(transformers' load report above names them)") from None
    get_arch(model)
    if compressed is not None:
        compressed.attach(model)
        note = compressed.dequantize_warning()
        if note:
            warnings.warn(note, stacklevel=2)
    if src.gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tokenizer = None
    if adapter is not None:
        tokenizer = adapter_tokenizer(adapter, padding_side)
        rows = model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None and len(tokenizer) > rows:  # the fine-tune added tokens
            model.resize_token_embeddings(len(tokenizer))
        model = merge_adapter(model, adapter)
    model.to(target)
    return _finish(model, src, adapter, padding_side, tokenizer)


def adapter_tokenizer(adapter: str | Path, padding_side: str = "left"):
    """The tokenizer saved next to a PEFT adapter, or None: a fine-tune that changed the chat
    template or added tokens ships them there, and the base model's would render its prompts
    otherwise."""
    path = Path(adapter).expanduser()
    if not (path / "tokenizer_config.json").is_file():
        return None
    return load_tokenizer(ModelSource("dir", str(path), name=str(adapter)), padding_side=padding_side)


def load_skeleton(source: str | Path, trust_remote_code: bool = False):
    """The model's modules with no weights (on the meta device), from its config alone: enough
    for what the registry sees (blocks, pairs, shapes, parameter counts) at any size."""
    from transformers import AutoModelForCausalLM

    config = _read_config(resolve_source(source), trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _finish(model, src: ModelSource, adapter, padding_side: str, tokenizer=None):
    model.eval()
    # Recorded so that artefacts derived from this model can reload it.
    model.config.qrealign_source = src.reload_spec
    model.config.qrealign_adapter = str(Path(adapter).expanduser().resolve()) if adapter else None
    if tokenizer is None:
        tokenizer = load_tokenizer(src, padding_side=padding_side)
    return model, tokenizer


def _load_offloaded(src: ModelSource, adapter, offload: str, dtype, device, trust_remote_code: bool):
    """Reject early what disk offload cannot do, then build the model with its blocks on disk."""
    from .offload import load_offloaded

    if offload != "disk":
        raise ModelLoadError(f"offload={offload!r}: the only offload is 'disk'")
    if adapter is not None:
        raise ModelLoadError("offload='disk' cannot merge an adapter (merging needs every weight in memory); "
                             "merge it once without offload, save_pretrained, and offload that directory")
    if src.kind == "gguf":
        raise ModelLoadError(f"offload='disk' reads safetensors directories, not GGUF files ({src.name})")
    path = src.path
    if src.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(src.path, local_files_only=True)
        except Exception:  # huggingface_hub raises several types for "not in the local cache"
            raise ModelLoadError(f"offload='disk' needs a local snapshot of {src.name}; download it first "
                                 "(huggingface-cli download) or pass its directory") from None
    if dtype == "auto":
        raise ModelLoadError("offload='disk' needs an explicit dtype (float32, bfloat16, float16), not 'auto'")
    return load_offloaded(path, dtype, device, trust_remote_code)


def check_adapter_dir(adapter: str | Path) -> Path:
    """The adapter directory, or a one-line error if it holds no PEFT adapter (cheap: callers
    with several models check every adapter before loading the first)."""
    adapter = Path(adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    return adapter


def merge_adapter(model, adapter: str | Path):
    """Apply a PEFT adapter and merge it into the weights (the deployer ships merged weights)."""
    from peft import PeftModel

    adapter = check_adapter_dir(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"adapter {adapter} does not match the base model: {first}") from None
    return peft_model.merge_and_unload()
