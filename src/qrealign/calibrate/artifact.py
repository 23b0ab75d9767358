"""A quantization run on disk: `quant_params.safetensors` (learned LET scales and LWC factors,
a few MB even for 70B; learned rounding adds one int8 per weight) + `qrealign.json` (source model, scheme, config, calibration provenance).
The quantized model is rebuilt on top of the FP model: fold the scales, load the clipping,
freeze the fake-quantized weights, keep activation quantization on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import IncompatibleArtifact
from ..models.registry import get_arch, get_blocks, head_layout
from ..quant.let import LETParams, cast_keeping_folded_norms
from ..quant.qlinear import QuantLinear, wrap_linears
from ..quant.scheme import Scheme, get_scheme
from ..tensorfiles import TensorFiles
from ..utils import (atomic_dir, fingerprint_matches, read_json, resolve_device, resolve_dtype,
                     save_tensors, write_json)
from .engine import apply_block_params

FORMAT_VERSION = 1
PARAMS_FILE = "quant_params.safetensors"
META_FILE = "qrealign.json"


def save_quantized(out_dir: str | Path, params: dict[str, torch.Tensor], metadata: dict,
                   extra_files: dict[str, bytes] | None = None) -> Path:
    meta = {"kind": "quantized", "format_version": FORMAT_VERSION, **metadata}
    source = meta.get("source")
    if isinstance(source, str) and Path(source).exists():
        # Also where the base model lies from the run: a folder that holds both (the demo's stages)
        # can move and the run still finds its base (`run_source`).
        meta["source_relative"] = os.path.relpath(Path(source).resolve(), Path(out_dir).resolve())
    with atomic_dir(out_dir, marker=META_FILE, kind="quantized") as tmp:
        # a TensorFiles is written from disk one tensor at a time (`save_tensors`), not loaded whole
        tensors = params if isinstance(params, TensorFiles) else {k: v.contiguous() for k, v in params.items()}
        save_tensors(tensors if len(tensors) else {"_empty": torch.zeros(1)}, tmp / PARAMS_FILE)
        write_json(tmp / META_FILE, meta)
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
    return Path(out_dir)


def read_quantized_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise IncompatibleArtifact(f"{path} is not a qrealign quantization run (no {META_FILE})")
    meta = read_json(path / META_FILE)
    if meta.get("kind") != "quantized":
        raise IncompatibleArtifact(f"{path}: {META_FILE} describes a {meta.get('kind')!r}, not a quantized model")
    if not (path / PARAMS_FILE).is_file():
        raise IncompatibleArtifact(f"{path}: {PARAMS_FILE} is missing")
    return meta


def read_params(run_dir: str | Path) -> TensorFiles:
    """A run's learned parameters, each read from its file when asked for: with learned rounding
    they are one int8 per weight (about 69 GB for 70B), not to be held at once."""
    path = Path(run_dir) / PARAMS_FILE
    try:
        params = TensorFiles([path])
    except Exception as exc:  # safetensors raises its own error types for every corruption
        raise IncompatibleArtifact(f"{path} is corrupt ({exc})") from None
    params.drop("_empty")
    return params


def apply_quant_params(model, scheme: str | Scheme | dict, params: dict[str, torch.Tensor],
                       freeze: bool = True) -> None:
    """Turn an FP model into the quantized model described by `params`, in place.

    With `freeze=False` the QuantLinears keep their folded FP weights (LET applied, LWC loaded)
    instead of the fake-quantized ones: exporters compute integer codes from those."""
    scheme = get_scheme(scheme)
    check_param_layers(model, params)
    for i in range(len(get_blocks(model))):
        apply_block_quant_params(model, i, scheme, params, freeze)


def check_param_layers(model, params: dict[str, torch.Tensor]) -> None:
    """Refuse parameters learned for more layers than the model has (another model's run)."""
    n_blocks = len(get_blocks(model))
    layers_in_params = {int(m[1]) for k in params if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers_in_params and max(layers_in_params) >= n_blocks:
        raise IncompatibleArtifact(
            f"parameters cover {max(layers_in_params) + 1} layers but the model has {n_blocks}")


def apply_block_quant_params(model, i: int, scheme: Scheme, params: dict[str, torch.Tensor],
                             freeze: bool = True) -> None:
    """`apply_quant_params` for block i alone: a streaming exporter has only that block in memory.

    With `freeze=False` the block stays in float32 whatever the model's dtype: casting its folded
    weights and clipping factors back to bf16 would round them before the exporter computes codes
    (other codes than the run learned); the exporter casts what it writes itself."""
    spec = get_arch(model)
    block = get_blocks(model)[i]
    prefix = f"layers.{i}."
    pairs = tuple(k[len(prefix) + 4:] for k in params if k.startswith(prefix + "let."))
    has_lwc = any(k.startswith(prefix + "lwc.") for k in params)
    has_rounding = any(k.startswith(prefix + "round.") for k in params)
    # Fold and freeze in float32 and cast back afterwards, as calibration did (engine._to_compute):
    # folding straight into bf16 weights rounds them before they are quantized, and the codes of
    # a run calibrated on a bf16 model would not be the ones it learned.
    dtype = next(block.parameters()).dtype
    if dtype != torch.float32:
        block.float()
    wrap_linears(block, spec.linears, scheme, lwc=has_lwc, rounding=has_rounding)
    layout = head_layout(model.config)
    let = LETParams(spec, block, layout, pairs, _rope_invariant(params, prefix, layout)) if pairs else None
    try:
        apply_block_params(i, block, let, params)
    except (KeyError, RuntimeError) as exc:
        raise IncompatibleArtifact(f"quantization parameters do not fit layer {i}: {exc}") from None
    if let is not None:
        let.fold_(block)
    for m in block.modules():
        if not isinstance(m, QuantLinear):
            continue
        if freeze:
            m.freeze()
        elif m.weight_quantizer is not None:  # an exporter computes codes: a byte per offset, not a float
            m.weight_quantizer.rounding_as_int8_()
    if dtype != torch.float32 and freeze:
        cast_keeping_folded_norms(block, spec, dtype)


def _rope_invariant(params, prefix, layout) -> bool:
    qk = params.get(prefix + "let.qk")
    return qk is not None and qk.numel() == layout.num_kv_heads * layout.head_dim // 2


def run_source(meta: dict, run_dir: str | Path | None = None) -> str:
    """Where to load the base model of a run from. The recorded `source` when it exists (or is not
    a local path at all: an embedded name, a hub id); otherwise, for a run that moved with its base
    (a demo output folder copied or renamed as a whole), the base found from the run directory:
    its recorded relative path, then a sibling folder of the recorded name. A found base is used
    only when the run recorded the base's fingerprint, which `load_run_source` then checks."""
    from ..models.load import looks_like_path

    source = meta.get("source")
    if not source:
        raise IncompatibleArtifact(
            "this run records no source model: it was calibrated on a model that exists only in memory (e.g. "
            "straight after `align` or `attack` in Python). Save that model (`save_pretrained`) and calibrate the "
            "saved copy, or apply the run to it yourself: `apply_quant_params(model, meta['scheme'], params)`")
    if run_dir is None or Path(source).exists() or not meta.get("model_fingerprint") or not looks_like_path(source):
        return source
    run_dir = Path(run_dir)
    candidates = [run_dir / meta["source_relative"]] if meta.get("source_relative") else []
    candidates.append(run_dir.parent / Path(source).name)
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    return source


def base_needed(source: str) -> str:
    """What to do when a run's base model is not where the run recorded it."""
    return (f"A run folder holds only its quantization parameters: it needs the model it was calibrated on "
            f"({source}); put that model there, or beside the run folder under the same name")


def load_run_source(meta: dict, dtype: str | None = None, device="cpu", offload: str | None = None,
                    run_dir: str | Path | None = None):
    """(model, tokenizer, dtype name): the model a run was calibrated on (`run_source`), loaded in
    the dtype it was calibrated in and checked against the run's fingerprint (which hashes the
    weights' bits, so a bf16-calibrated run is checked in bf16). Runs that did not record their
    dtype were calibrated in float32 by the CLI; `dtype` is then tried too, for API runs in another one."""
    from ..models.load import ModelLoadError, load_model, looks_like_path

    source = run_source(meta, run_dir)
    recorded = meta.get("model_dtype")
    tries = [recorded] if recorded else list(dict.fromkeys(["float32", *([dtype] if dtype else [])]))
    expected = meta.get("model_fingerprint")
    for name in tries:
        try:
            model, tokenizer = load_model(source, adapter=meta.get("adapter"), dtype=name, device=device,
                                          offload=offload)
        except ModelLoadError as exc:
            if not (looks_like_path(source) and not Path(source).exists()):
                raise
            raise ModelLoadError(f"{exc}. {base_needed(source)}") from None  # the base moved or is elsewhere
        if not expected or fingerprint_matches(model, expected, meta):
            return model, tokenizer, str(next(model.parameters()).dtype).removeprefix("torch.")
        del model
    raise IncompatibleArtifact(f"{source} is not the model this run was calibrated on (fingerprint mismatch)")


def load_quantized(path: str | Path, device: str | torch.device | None = "cpu", dtype: str = "float32"):
    """(model, tokenizer, metadata) for a quantization run directory."""
    path = Path(path)
    meta = read_quantized_metadata(path)
    params = read_params(path)
    want = resolve_dtype(dtype)
    # Loaded in the dtype it was calibrated in (on the CPU when it is cast afterwards), checked there.
    same = not isinstance(want, torch.dtype) or str(want).removeprefix("torch.") == meta.get("model_dtype", "float32")
    model, tokenizer, calibrated = load_run_source(meta, dtype, device=device if same else "cpu", run_dir=path)
    if not same and want == torch.float32:
        # A run calibrated on a bf16 model, asked for in float32: its parameters apply to float32
        # weights, as calibration computed its loss and as the export writes the codes; applied
        # before the cast they would be rounded to bf16 first (logits 1e-2 apart, review 85).
        model.float()
    apply_quant_params(model, meta["scheme"], params)
    if not same:
        if calibrated == "float32":
            import warnings

            # Measured on the demo's first-token W8A8 run: 5 of 8 harmful prompts kept their outcome.
            warnings.warn(f"this run was calibrated in float32 and now runs in {dtype}: the fake-quantized "
                          "arithmetic changes with it, and so do its answers (use float32 for numbers to compare)",
                          stacklevel=2)
        model.to(device=resolve_device(device), dtype=want)
    model.config.qrealign_quant_run = str(path.resolve())
    return model, tokenizer, meta
