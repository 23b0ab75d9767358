"""Generic capture of what the decoder blocks receive: no hand-written decoder layers.

One forward pass per batch runs the embeddings (and only as many blocks as needed) with
pre-forward hooks that record the hidden states entering block 0 and the keyword arguments each
block is called with (attention mask, rotary embeddings, position ids). Architectures that
alternate attention types (Gemma-2/3 sliding/full) get the kwargs of each type. Blocks are then
replayed one at a time with these recorded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.offload import offloaded, streaming_blocks
from ..models.registry import block_types, get_blocks
from .data import CalibBatch


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [B, T, d] entering block 0
    kwargs_by_type: dict  # attention_type -> kwargs for blocks of that type


_DROP = ("past_key_values", "past_key_value", "cache", "use_cache", "output_attentions")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batch: CalibBatch, device: torch.device) -> BlockInputs:
    return record_block_inputs(model, batch.enc.input_ids, batch.enc.attention_mask, batch.position_ids, device)


@torch.no_grad()
def record_block_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, device: torch.device) -> BlockInputs:
    """Hidden states entering block 0 and each block type's kwargs, from one forward pass that
    stops at the first block of the last type (only those blocks are read, if offloaded)."""
    blocks = get_blocks(model)
    types = block_types(model)
    needed = {t: types.index(t) for t in dict.fromkeys(types)}  # first block of each type
    last_needed = max(needed.values())
    record: dict = {}

    def make_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                record["hidden"] = hidden.detach()
            if types[i] not in record.setdefault("kw", {}):
                record["kw"][types[i]] = {k: v for k, v in kwargs.items() if k not in _DROP and k != "hidden_states"}
            if i == last_needed:
                raise _Stop
        return hook

    handles = [blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in sorted(needed.values())]
    try:  # a disk-offloaded block is read only if the pass reaches it (after the hooks above)
        with streaming_blocks(model, device):
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(record["hidden"], record["kw"])


@torch.no_grad()
def run_blocks(model: nn.Module, inputs: list[BlockInputs], device: torch.device, upto: int | None = None,
               visit=None, desc: str | None = None) -> list[torch.Tensor]:
    """Every batch's recorded block-0 input through the model's blocks, block-major: block i is
    put on `device` once (read from disk for an offloaded model, moved there and back for one in
    memory), runs all batches and is released before block i+1 (a batch-by-batch forward would
    move each block once per batch). Same kwargs and order of operations per block as the model's
    forward. `visit(i, b, hidden)` sees batch b's output of block i; returns the outputs of block
    `upto` (default: the last). Holds all batches' states."""
    source, types, blocks = offloaded(model), block_types(model), get_blocks(model)
    hidden = [x.hidden.to(device) for x in inputs]
    kwargs = [{t: move_kwargs(kw, device) for t, kw in x.kwargs_by_type.items()} for x in inputs]
    last = len(types) - 1 if upto is None else upto
    for i in tqdm(range(last + 1), desc=desc, unit="block", disable=desc is None):
        home = None
        try:
            if source is not None:
                block = source.onload(i, device)
                block.eval()
            else:
                block = blocks[i]
                home = next(block.parameters()).device
                block.to(device)
            for b, kw in enumerate(kwargs):
                hidden[b] = block_output(block(hidden[b], **kw[types[i]]))
                if visit is not None:
                    visit(i, b, hidden[b])
        finally:
            if source is not None:
                source.release(i)
            elif home is not None:
                blocks[i].to(home)
    return hidden


def block_output(out):
    """HF blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out


def move_kwargs(kwargs: dict, device: torch.device) -> dict:
    def mv(v):
        if torch.is_tensor(v):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v
    return {k: mv(v) for k, v in kwargs.items()}
