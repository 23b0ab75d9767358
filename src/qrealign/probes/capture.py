"""Last-prompt-token hidden states at the output of every decoder block.

The probes are fit on, and the quantizer later applies them to, the same tensor: the raw output
of decoder block l (what the calibration engine sees as that block's target), at the last token of
the chat-rendered prompt. Two of the authors' bugs are avoided here by construction:

* bug 10 — HF's `hidden_states[-1]` is the *post-final-norm* state, while the loss is applied to the
  last block's *pre-norm* output. We hook the blocks themselves, so every layer (the last included)
  is captured pre-final-norm.
* bug 11 — `mask.sum() - 1` is only the last token under right padding. We take
  `EncodedPrompts.last_index` (read from the mask) and pass position ids counted from the first
  real token, exactly as `generate()` does, so left and right padding give the same states.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import QrealignError
from ..models.chat import encode_prompts
from ..models.offload import offloaded
from ..models.registry import get_blocks
from ..utils import same_device


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: nothing after it is needed (the final
    norm and the LM head are skipped, which also saves the vocabulary-sized matmul)."""


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from the first real token (pads get 1), as HF `generate` builds them.

    Without them HF numbers positions 0..T-1 regardless of padding, so a left-padded prompt would be
    rotated differently from the same prompt right-padded (equal in exact arithmetic under RoPE,
    but not bit-for-bit, and not at all for absolute-position models)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Validate a layer selection (negative indices count from the end); None = every block."""
    if layers is None:
        return list(range(num_layers))
    if not len(layers):
        raise QrealignError("no layers selected (an empty layer list); pass None for every block")
    out = []
    for layer in layers:
        idx = int(layer) + num_layers if int(layer) < 0 else int(layer)
        if not 0 <= idx < num_layers:
            raise QrealignError(f"layer {layer} out of range: the model has {num_layers} decoder blocks")
        out.append(idx)
    if len(set(out)) != len(out):
        raise QrealignError(f"duplicate layers in {list(layers)}")
    return out


@torch.no_grad()
def capture_last_token_states(
    model,
    tokenizer,
    prompts: list[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    device=None,
    system: str | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Hidden state of the last prompt token at the output of each requested decoder block.

    Returns a float32 CPU tensor [len(layers), len(prompts), hidden] (all blocks when `layers` is
    None), rows in prompt order. `device`: where to run; None = wherever the model already is (a
    model held elsewhere runs there block by block, one block on the device at a time). Prompts
    are sorted by length into batches so batches pad little; the result does not depend on
    batching or padding side.
    """
    prompts = [getattr(p, "text", p) for p in prompts]  # accept Prompt objects too
    if not prompts:
        raise QrealignError("no prompts to capture states for")
    blocks = get_blocks(model)
    layer_ids = resolve_layers(layers, len(blocks))
    # block by block unless the model is where it runs: a disk-offloaded model, or one held on the
    # CPU and run on a GPU (moving a 7B float32 model there whole would not fit a 24 GB card)
    if offloaded(model) is not None or (device is not None and not same_device(torch.device(device),
                                                                               _model_device(model))):
        return _capture_block_major(model, tokenizer, prompts, layer_ids, batch_size, device, system, max_length,
                                    padding_side, progress)
    row_of = {layer: i for i, layer in enumerate(layer_ids)}
    deepest = max(layer_ids)

    home = _model_device(model)
    run_device = home if device is None else torch.device(device)
    if run_device != home:
        model.to(run_device)
    was_training = model.training
    model.eval()

    hidden = getattr(model.config, "hidden_size", None)
    out: torch.Tensor | None = None
    current: dict = {}  # "last" -> last-token index of the batch; layer -> captured rows

    def make_hook(layer: int):
        def hook(module, args, output):
            h = _block_output(output)
            rows = torch.arange(h.shape[0], device=h.device)
            current[layer] = h[rows, current["last"]].float().cpu()
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layer_ids]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="capturing states", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode_prompts(tokenizer, [prompts[i] for i in idx], system=system,
                                 max_length=max_length, padding_side=padding_side).to(run_device)
            current.clear()
            current["last"] = enc.last_index
            try:
                model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      position_ids=prompt_position_ids(enc.attention_mask), use_cache=False)
            except _StopForward:
                pass
            if out is None:
                width = current[deepest].shape[-1]
                if hidden is not None and width != hidden:
                    raise QrealignError(f"block output width {width} != config.hidden_size {hidden}")
                out = torch.empty(len(layer_ids), len(prompts), width, dtype=torch.float32)
            index = torch.tensor(idx)
            for layer in layer_ids:
                out[row_of[layer], index] = current[layer]
            bar.update(len(idx))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        if run_device != home:
            model.to(home)
        model.train(was_training)
    return out


@torch.no_grad()
def _capture_block_major(model, tokenizer, prompts, layer_ids, batch_size, device, system, max_length,
                         padding_side, progress) -> torch.Tensor:
    """`capture_last_token_states` for a disk-offloaded model, or one held away from `device`:
    every batch enters block 0, then the blocks run one at a time over all batches (on `device`,
    default where the model was loaded), so the checkpoint is read once and the device holds one
    block. The states equal the in-memory capture's."""
    from ..calibrate.capture import record_block_inputs, run_blocks

    home = model.get_input_embeddings().weight.device
    row_of = {layer: i for i, layer in enumerate(layer_ids)}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        index, last, inputs = [], [], []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode_prompts(tokenizer, [prompts[i] for i in idx], system=system, max_length=max_length,
                                 padding_side=padding_side)
            index.append(torch.tensor(idx))
            last.append(enc.last_index)
            inputs.append(record_block_inputs(model, enc.input_ids, enc.attention_mask,
                                              prompt_position_ids(enc.attention_mask), home))
        out = torch.empty(len(layer_ids), len(prompts), inputs[0].hidden.shape[-1], dtype=torch.float32)

        def record(i, b, hidden):
            if i in row_of:
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                out[row_of[i], index[b]] = hidden[rows, last[b].to(hidden.device)].float().cpu()

        run_blocks(model, inputs, torch.device(device) if device is not None else home,
                   upto=max(layer_ids), visit=record,
                   desc="capturing states (block by block)" if progress else None)
    finally:
        model.train(was_training)
    return out
