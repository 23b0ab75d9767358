"""Streaming compressed-tensors export: a run of a model larger than CPU RAM.

`export_compressed_tensors(..., offload="disk")` loads the model with its decoder blocks left in
the safetensors files (`models.offload`). Each block is read, given its learned parameters, turned
into integer codes, compressed by the same compressed-tensors calls as the in-memory export,
checked bit for bit, written as its own safetensors shard and dropped again: memory holds the
non-block tensors (embeddings, final norm, LM head) plus one block. The shards and
`model.safetensors.index.json` follow `save_pretrained`'s sharded layout; tensor names, dtypes and
values, config.json and the other files equal the in-memory export's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibrate.artifact import apply_block_quant_params, check_param_layers
from ..models.offload import offloaded
from ..models.registry import get_blocks
from ..utils import resolve_dtype, save_tensors
from .compressed import (_attach_codes, _plain_config, _replace_quant_linears, _verify_roundtrip, norm_storage_error,
                         warn_norm_storage)
from .plan import ExportError, ExportPlan

INDEX_FILE = "model.safetensors.index.json"


def check_streamable(run_dir: Path, meta: dict, offload: str, source: str) -> None:
    """Refuse, before anything is loaded or written, a run whose model cannot be read block by block.
    `source`: where the run's base is now (`run_source`: it may have moved with the run)."""
    from ..models.load import resolve_source

    if offload != "disk":
        raise ExportError(f"offload={offload!r}: the only offload is 'disk'")
    if meta.get("adapter"):
        raise ExportError(f"{run_dir} was calibrated on {meta['source']} with adapter {meta['adapter']} merged; "
                          "a streamed export cannot merge an adapter (it needs every weight in memory): "
                          "export without --offload")
    if resolve_source(source).kind == "gguf":
        raise ExportError(f"{run_dir} was calibrated on a GGUF file ({meta['source']}); a streamed export reads "
                          "safetensors directories only: export without --offload")


def write_streamed(model, tokenizer, plan: ExportPlan, params: dict[str, torch.Tensor], out: Path,
                   progress: bool) -> float:
    """Write the checkpoint of a disk-offloaded `model` into `out`, one block in memory at a time;
    returns `check_norm_storage`'s error."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    source = offloaded(model)
    check_param_layers(model, params)
    torch_dtype = resolve_dtype(plan.dtype)
    n_blocks = len(get_blocks(model))
    shards = _Shards(model, out, n_blocks + 1)
    shards.write(_non_block_tensors(model, source.prefix, torch_dtype))
    norm_error = norm_storage_error(model, model, torch_dtype)  # the resident norms (final norm)
    for i in tqdm(range(n_blocks), desc="export: blocks", disable=not progress):
        source.onload(i, "cpu")
        try:
            block = _compressed_block(model, i, plan, params, torch_dtype)
            norm_error = max(norm_error, norm_storage_error(model, get_blocks(model)[i], torch_dtype))
            shards.write(block)
        finally:
            source.release(i)  # keeps the block's compressed-tensors schemes, on the meta device
    shards.write_index(model.num_parameters())

    # The released blocks still carry their schemes: the library derives the same config from them.
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=plan.ct_format)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    _plain_config(model, torch_dtype)
    _save_configs(model, out)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)
    return warn_norm_storage(norm_error, torch_dtype)


def _compressed_block(model, i: int, plan: ExportPlan, params: dict[str, torch.Tensor],
                      torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Block i's compressed tensors under their checkpoint names, floating ones in `torch_dtype`."""
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.config import CompressionFormat

    apply_block_quant_params(model, i, plan.scheme, params, freeze=False)
    block = get_blocks(model)[i]
    prefix = f"{offloaded(model).prefix}{i}."
    codes = _replace_quant_linears(block, plan, progress=False, prefix=prefix)
    _attach_codes(block, plan, codes)
    for name in codes:  # what ModelCompressor.compress_model does to each quantized module
        compress_module(block.get_submodule(name), CompressionFormat(plan.ct_format))
    _verify_roundtrip(block, codes, plan)
    return {prefix + k: _cast(t, torch_dtype) for k, t in block.state_dict().items()}


def _non_block_tensors(model, block_prefix: str, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm, LM head...: tied aliases removed as `save_pretrained` does (before
    the cast, which would separate them)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: t for k, t in model.state_dict().items() if not k.startswith(block_prefix)}
    state = remove_tied_weights_from_state_dict(state, model)
    return {k: _cast(t, torch_dtype) for k, t in state.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What `model.to(dtype)` does to one tensor: floating ones change, integer codes do not."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class _Shards:
    """`model-0000k-of-0000n.safetensors` written one at a time, then the index `save_pretrained`
    writes for a sharded checkpoint."""

    def __init__(self, model, out: Path, total: int):
        self.model, self.out, self.total = model, out, total
        self.weight_map: dict[str, str] = {}
        self.total_size = self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        self.written += 1
        name = f"model-{self.written:05d}-of-{self.total:05d}.safetensors"
        tensors = dict(revert_weight_conversion(self.model, tensors))  # checkpoint names, as save_pretrained
        save_tensors({k: t.contiguous() for k, t in tensors.items()}, self.out / name, metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_index(self, total_parameters: int) -> None:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
                 "weight_map": self.weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_configs(model, out: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
