"""`export_compressed_tensors`: a quantization run -> a compressed-tensors checkpoint.

The run directory holds only the learned parameters; the model is rebuilt from its source:
load the FP model, fold every LET scale into norms and weights and load the LWC factors
(`apply_quant_params(freeze=False)` keeps the folded FP weights), compute each linear's integer
codes, scales and zero points on the calibrated grid, then let the compressed-tensors library
lay them out (`int-quantized` int8 for W8A8, `pack-quantized` int32-packed for weight-only) and
write config.json's `quantization_config`. What comes out is the plain HF architecture with
standard module names, loadable by transformers and by vLLM/SGLang where their kernels cover
the scheme (see plan.py). Every compressed weight is decoded again before writing and must equal
the calibrated fake-quant weight bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.artifact import (apply_quant_params, base_needed, load_run_source, read_params,
                                  read_quantized_metadata, run_source)
from ..models.load import looks_like_path
from ..quant.qlinear import QuantLinear
from ..quant.scheme import get_scheme
from ..utils import atomic_dir, available_memory, check_out_dir, read_json, resolve_dtype, write_json
from .card import shareable_source
from .codes import LinearCodes, linear_codes
from .compat import tokenizer_with_legacy_keys, with_legacy_keys
from .plan import ExportError, ExportPlan, plan_export, require_compressed_tensors

EXPORT_FORMAT_VERSION = 1
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}
#: The dtypes an export stores its floating parts in (the values `_DTYPES` maps its aliases to).
EXPORT_DTYPES = tuple(dict.fromkeys(_DTYPES.values()))


@dataclass
class ExportResult:
    out_dir: Path
    plan: ExportPlan
    sizes: dict

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), **self.plan.to_dict(), "sizes": self.sizes}


def export_compressed_tensors(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    symmetric_weights: bool = False,
    symmetric_activations: bool = False,
    card_table: str | os.PathLike | None = None,
    progress: bool = True,
    offload: str | None = None,
) -> ExportResult:
    """Write the quantized model of `run_dir` to `out_dir` as a compressed-tensors checkpoint.

    dtype: storage dtype of everything that is not an integer code (embeddings, norms, lm_head,
    biases, scales); engines compute in bf16/fp16, float32 keeps the export bit-faithful to the
    float32 calibrated model. symmetric_weights / symmetric_activations: re-express an asymmetric
    run symmetrically for engines that need it (inexact, recorded). card_table: Markdown text,
    or a path to a Markdown file (as the CLI's --card-table), e.g. a before/after evaluation
    table, for the model card. offload="disk": stream the export
    one decoder block at a time (models larger than CPU RAM; see stream.py), same tensors and
    config. Nothing is written unless the whole export succeeds."""
    from .card import render_card
    from .stream import check_streamable, write_streamed

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if isinstance(card_table, os.PathLike):  # a file, as the CLI reads it; a str stays the text itself
        from ..errors import QrealignError
        from ..utils import read_user_text

        try:
            card_table = read_user_text(card_table, "card_table")
        except QrealignError as exc:
            raise ExportError(str(exc)) from None
    require_compressed_tensors("export")
    if dtype not in _DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    meta = read_quantized_metadata(run_dir)
    plan = plan_export(get_scheme(meta["scheme"]), _DTYPES[dtype], symmetric_weights, symmetric_activations)
    source = run_source(meta, run_dir)  # a run that moved with its base (a renamed demo folder) finds it
    if looks_like_path(source) and not Path(source).exists():  # before the memory check reads its config
        raise ExportError(f"the run's base model {source} does not exist. {base_needed(source)}")
    params = read_params(run_dir)  # the file's header only: each tensor is read when its block asks
    rounding = any(k.rsplit(".", 1)[-1] == "rounding" for k in params)
    if offload is not None:
        check_streamable(run_dir, meta, offload, source)
    else:
        _check_memory(source, rounding)
    _check_out_dir(out_dir)
    if plan.weights != plan.scheme.weights and rounding:
        # the offsets choose floor or ceil on the calibrated grid: on another grid they mean nothing
        plan = replace(plan, deviations=plan.deviations + (
            "learned rounding discarded (its offsets belong to the calibrated grid; calibrate a -sym scheme to "
            "keep it)",))

    # checked in the dtype it was calibrated in, then computed in float32 as calibration did
    model, tokenizer, _ = load_run_source(meta, "float32", device="cpu", offload=offload, run_dir=run_dir)
    if offload is None:
        model.float()
    n_params = sum(p.numel() for p in model.parameters())
    _check_shapes(model, plan)
    if offload is None:
        apply_quant_params(model, plan.scheme, params, freeze=False)
        codes = _replace_quant_linears(model, plan, progress)

    _check_out_dir(out_dir)  # again: the load and the codes took minutes, and the swap replaces what is there
    with atomic_dir(out_dir) as tmp:
        if offload is None:
            norm_error = _write_checkpoint(model, tokenizer, plan, codes, tmp)
        else:
            norm_error = write_streamed(model, tokenizer, plan, params, tmp, progress)
        sizes = _sizes(tmp, source, n_params)
        block = {**plan.to_dict(), "source": shareable_source(meta["source"]),
                 "run_fingerprint": meta.get("run_fingerprint")}
        config = with_legacy_keys(read_json(tmp / "config.json"))  # engines on transformers 4 read it too
        config["qrealign_export"] = block
        write_json(tmp / "config.json", config)
        if (tmp / "tokenizer_config.json").exists():
            write_json(tmp / "tokenizer_config.json", tokenizer_with_legacy_keys(read_json(tmp / "tokenizer_config.json")))
        write_json(tmp / "qrealign.json", {**_export_metadata(run_dir, meta, plan, sizes, source),
                                           "norm_storage_max_rel_error": norm_error})
        (tmp / "README.md").write_text(render_card(meta, plan, sizes, card_table))
        _shareable(tmp)
    return ExportResult(out_dir, plan, sizes)


# ---- steps ---------------------------------------------------------------------------------

# An in-memory export's peak of anonymous memory over its model's float32 weights: the model, the
# codes, the cast copy and the writer's state dict overlap. Measured 1.63x (review 85: a 103 M-weight
# Llama, W8A8, bf16 export, RssAnon sampled); counted with a margin.
PEAK_OVER_WEIGHTS = 1.75


def _check_memory(source: str, rounding: bool = False) -> None:
    """An export in memory holds the whole model in float32 (codes are computed as calibration ran),
    and at its peak about PEAK_OVER_WEIGHTS times that; refuse, before loading, a model whose peak
    exceeds the RAM available, where the kernel would kill the process halfway: the streamed export
    reads one block at a time. With learned rounding each quantized linear also holds its offsets,
    one int8 per weight, until its codes are computed (review 74)."""
    from ..models.load import load_skeleton
    from ..models.registry import get_blocks

    available = available_memory()
    if available is None:
        return
    skeleton = load_skeleton(source)
    need = int(PEAK_OVER_WEIGHTS * 4 * sum(p.numel() for p in skeleton.parameters()))
    if rounding:
        need += sum(m.weight.numel() for block in get_blocks(skeleton) for m in block.modules()
                    if isinstance(m, nn.Linear))
    if need > available:
        what = " (and learned rounding's int8 offsets)" if rounding else ""
        raise ExportError(f"exporting in memory holds the model in float32{what}, about {need / 2**30:.1f} GiB at "
                          f"its peak, and {available / 2**30:.1f} GiB of RAM is available: export with --offload disk "
                          "(offload='disk'), which holds one block at a time")


def _check_out_dir(out_dir: Path) -> None:
    """The output replaces `out_dir` wholesale, so only an empty directory or an earlier export may
    be overwritten: `--out` pointing at the run, the source model or a parent folder must not
    delete it."""
    check_out_dir(out_dir, "qrealign.json", kind="export", what="a qrealign export", error=ExportError)


def _check_shapes(model, plan: ExportPlan) -> None:
    """Groups must tile every quantized linear's input (before anything is built on them)."""
    from ..models.registry import get_arch, get_blocks

    w = plan.weights
    if w.strategy != "group":
        return
    for i, block in enumerate(get_blocks(model)):
        for name in get_arch(model).linears:
            in_features = block.get_submodule(name).in_features
            if in_features % w.group_size:
                raise ExportError(f"group size {w.group_size} does not divide {name}.in_features={in_features} "
                                  f"(layer {i}); calibrate with a group size that does (e.g. -g64)")


def _replace_quant_linears(root, plan: ExportPlan, progress: bool, prefix: str = "") -> dict[str, LinearCodes]:
    """Swap every QuantLinear under `root` for a plain nn.Linear holding its dequantized weight;
    keep the codes (keyed by name under `root`; `prefix` names `root` in error messages)."""
    names = [n for n, m in root.named_modules() if isinstance(m, QuantLinear)]
    codes: dict[str, LinearCodes] = {}
    for name in tqdm(names, desc="export: integer codes", disable=not progress):
        qlinear = root.get_submodule(name)
        c = linear_codes(prefix + name, qlinear, plan.weights)
        # no random init, and the weight *is* the dequantized tensor: one copy in memory, not two
        linear = torch.nn.utils.skip_init(nn.Linear, qlinear.in_features, qlinear.out_features,
                                          bias=qlinear.bias is not None)
        linear.weight = nn.Parameter(c.dequantized, requires_grad=False)
        if qlinear.bias is not None:
            linear.bias = nn.Parameter(qlinear.bias.detach().float().clone(), requires_grad=False)
        root.set_submodule(name, linear)
        codes[name] = c
    return codes


def _write_checkpoint(model, tokenizer, plan: ExportPlan, codes: dict[str, LinearCodes], out: Path) -> float:
    """Writes the checkpoint; returns `check_norm_storage`'s error."""
    from compressed_tensors.compressors import ModelCompressor

    _attach_codes(model, plan, codes)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=plan.ct_format)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    _verify_roundtrip(model, codes, plan)

    torch_dtype = resolve_dtype(plan.dtype)
    norm_error = check_norm_storage(model, torch_dtype)
    model.to(torch_dtype)  # floating tensors only: integer codes and zero points keep their dtype
    _plain_config(model, torch_dtype)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)
    return norm_error


NORM_STORAGE_TOLERANCE = 0.01  # relative error of a norm's multiplier that an export warns about


def check_norm_storage(model, torch_dtype: torch.dtype) -> float:
    """The largest relative error that storing the norms in `torch_dtype` puts on their multiplier
    (offset + w), warned about above NORM_STORAGE_TOLERANCE. Gemma's norms multiply by (1 + w): a
    smoothing scale s folded in stores (1 + w) / s - 1, near -1 for a large s, and bf16 keeps few
    bits of the small multiplier left over (measured on a tiny Gemma-2 with scales ~20: 9 % on a
    channel, 4.6 % on the block output; Llama-style norms store w / s and keep 0.4 %)."""
    return warn_norm_storage(norm_storage_error(model, model, torch_dtype), torch_dtype)


def norm_storage_error(model, module, torch_dtype: torch.dtype) -> float:
    """`check_norm_storage`'s measure over the norms of `module` (a part of `model`: the streamed
    export sees one block at a time)."""
    from ..models.registry import get_arch

    if torch_dtype == torch.float32:
        return 0.0
    offset = get_arch(model).norm_offset
    worst = 0.0
    for name, param in module.named_parameters():
        if param.dim() != 1 or not name.endswith("norm.weight") or param.device.type == "meta":
            continue
        exact = param.detach().float() + offset
        stored = param.detach().to(torch_dtype).float() + offset
        worst = max(worst, ((stored - exact).abs() / exact.abs().clamp_min(1e-12)).max().item())
    return worst


def warn_norm_storage(worst: float, torch_dtype: torch.dtype) -> float:
    if worst > NORM_STORAGE_TOLERANCE:
        import warnings

        warnings.warn(f"storing the norms in {str(torch_dtype).removeprefix('torch.')} changes a norm's multiplier "
                      f"by up to {100 * worst:.1f} % (smoothing scales folded into an (offset + w) norm); export "
                      "with dtype float32 to keep the calibrated model", stacklevel=4)
    return worst


def _attach_codes(root, plan: ExportPlan, codes: dict[str, LinearCodes]) -> None:
    """Give every coded linear under `root` its compressed-tensors scheme, scale and zero point
    (status FROZEN: ready to compress); any other nn.Linear is left unquantized."""
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    ignore = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n not in codes]
    apply_quantization_config(root, plan.ct_config(ignore), show_progress=False)
    for name, c in codes.items():
        module = root.get_submodule(name)
        _copy_param(module, "weight_scale", c.scale, name)
        if c.zero_point is not None:
            _copy_param(module, "weight_zero_point", c.zero_point, name)
        module.quantization_status = QuantizationStatus.FROZEN


def _plain_config(model, torch_dtype: torch.dtype) -> None:
    """The exported config.json is the plain architecture's: no qrealign load-time keys."""
    config = model.config
    for key in [k for k in vars(config) if k.startswith("qrealign_")]:
        delattr(config, key)
    config.dtype = torch_dtype


def _copy_param(module, attr: str, value: torch.Tensor, name: str) -> None:
    param = getattr(module, attr, None)
    if param is None or tuple(param.shape) != tuple(value.shape):
        found = None if param is None else tuple(param.shape)
        raise ExportError(f"{name}.{attr}: compressed-tensors expects {found}, computed {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _verify_roundtrip(root, codes: dict[str, LinearCodes], plan: ExportPlan) -> None:
    """Decode each compressed module under `root` with the library's own decompressor: it must give
    back the calibrated fake-quant weight exactly, or the checkpoint would be silently wrong."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    decoder = BaseCompressor.get_value_from_registry(plan.ct_format)
    for name, c in codes.items():
        module = root.get_submodule(name)
        decoded = decoder.decompress(get_direct_state_dict(module), module.quantization_scheme)["weight"]
        if decoded.shape != c.dequantized.shape or not torch.equal(decoded.float(), c.dequantized):
            diff = (decoded.float() - c.dequantized).abs().max().item() if decoded.shape == c.dequantized.shape else None
            raise ExportError(f"internal error: {name} decodes differently from the calibrated weight (max diff {diff})")


def _sizes(out: Path, source: str, n_params: int) -> dict:
    from ..models.load import resolve_source

    export_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source_bytes = source_dtype = None
    try:
        src = resolve_source(source)
    except Exception:  # a source that no longer resolves only costs us the comparison
        src = None
    if src is not None and src.kind in ("embedded", "dir"):
        source_bytes = sum(f.stat().st_size for f in Path(src.path).glob("*.safetensors")) or None
        cfg = Path(src.path) / "config.json"
        if cfg.is_file():
            c = read_json(cfg)
            source_dtype = c.get("dtype") or c.get("torch_dtype")
    elif src is not None and src.kind == "gguf":
        source_bytes = (Path(src.path) / src.gguf_file).stat().st_size
        source_dtype = "gguf"
    sizes = {"export_bytes": export_bytes, "source_bytes": source_bytes, "source_dtype": source_dtype,
             "parameters": n_params, "bf16_bytes": 2 * n_params}
    sizes["ratio_vs_source"] = round(export_bytes / source_bytes, 4) if source_bytes else None
    sizes["ratio_vs_bf16"] = round(export_bytes / sizes["bf16_bytes"], 4)
    return sizes


def _shareable(directory: Path) -> None:
    """Temp dirs and atomic JSON writes are created owner-only (0700/0600); a model directory is
    meant to be read by servers running as other users, so give it the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def _export_metadata(run_dir: Path, meta: dict, plan: ExportPlan, sizes: dict, source: str) -> dict:
    """qrealign.json of the export. Provenance is copied flat from the run's whole chain, so the
    evaluation overlap check still works when the export travels without the run; the run and
    source are named under keys the provenance walker does not follow (no duplicate stages).
    `source` is where the base was loaded from (a run that moved with its base finds it anew),
    the run's recorded path beside it when that moved. These are local paths: the card says so."""
    from ..evaluate.overlap import collect_provenance

    return {
        "kind": "export",
        "format_version": EXPORT_FORMAT_VERSION,
        "format": "compressed-tensors",
        "quantization_run": str(run_dir.resolve()),
        "source_model": source,
        **({"source_model_recorded": meta.get("source")} if meta.get("source") != source else {}),
        "merged_adapter": meta.get("adapter"),
        "model_type": meta.get("model_type"),
        "method": meta.get("method"),
        "run_fingerprint": meta.get("run_fingerprint"),
        "calibration": meta.get("calibration"),
        "export": plan.to_dict(),
        "sizes": sizes,
        "provenance": collect_provenance(run_dir),
    }
