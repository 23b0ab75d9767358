"""The training loops of calibration: one block at a time (OmniQuant), or a run of blocks together.

The engine (`engine.py`) decides what each block's inputs, targets and quantizers are; this file
only turns a loss into learned LET scales, clipping factors and roundings. One optimisation loop
(`_optimise`) serves both forms: a step is "run the batch, score it", and the forms differ only in
what a step runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..errors import QrealignError
from ..quant.let import LETParams
from ..quant.qlinear import QuantLinear, set_quant_state
from .capture import block_output
from .data import CalibBatch
from .losses import BlockLoss, LossInputs


class NonFiniteLoss(QrealignError):
    pass


def block_forward(block, let, x, kw, amp: str | None):
    """HF's own block with the LET-transformed weights (no copy of the block's code)."""
    overrides = let.transformed_params(block) if let is not None else {}
    ctx = torch.autocast(amp, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        return block_output(functional_call(block, overrides, (x,), kw)).float()


def loss_inputs(fp_out, q_out, batch: CalibBatch, mask, layer, num_layers, kwargs_by_type=None,
                recompute_tail: bool = False) -> LossInputs:
    dev = q_out.device
    fp_out = fp_out.to(dev) if fp_out is not None else None  # offload_targets: it waits in CPU memory
    return LossInputs(fp_out, q_out, batch.labels.to(dev), mask, batch.enc.last_index.to(dev), layer, num_layers,
                      index=batch.index, block_kwargs=kwargs_by_type, recompute_tail=recompute_tail)


def rounding_linears(block: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The block's QuantLinears whose weight quantizer learns its rounding."""
    return [(name, m) for name, m in block.named_modules()
            if isinstance(m, QuantLinear) and getattr(m.weight_quantizer, "rounding", None) is not None]


@dataclass
class Learnable:
    """One quantized block's learnable parts, as the training loops see them."""

    layer: int
    block: nn.Module
    let: LETParams | None
    kw: list  # per batch: the block's kwargs (its attention type's)
    fp_out: list  # per batch: the FP block output (None where no sample reads it)

    def forward(self, x, b: int, amp: str | None, recompute: bool = False):
        """`recompute` (CalibConfig.recompute): keep only the block's input for the backward and
        run the block again there, so a chain of blocks holds what its backward needs (the
        weights' fake-quantized and LET-transformed copies, the attention's intermediates) for
        one block at a time. The same operations on the same tensors: the same gradients."""
        if recompute and torch.is_grad_enabled():
            return checkpoint(block_forward, self.block, self.let, x, self.kw[b], amp, use_reentrant=False)
        return block_forward(self.block, self.let, x, self.kw[b], amp)


def _param_groups(parts: list[Learnable], cfg) -> tuple[list[dict], Callable[[], None]]:
    """AdamW groups (LET, LWC, rounding: each its own learning rate) over `parts`, and the
    projection that keeps them valid after a step."""
    lets = [p.let for p in parts if p.let is not None]
    lwc = [t for p in parts for n, t in p.block.named_parameters() if "bound_factor" in n]
    rounders = [m.weight_quantizer for p in parts for _, m in rounding_linears(p.block)]
    groups = []
    if lets:
        groups.append({"params": [t for let in lets for t in let.parameters()], "lr": cfg.lr_let})
    if lwc:
        groups.append({"params": lwc, "lr": cfg.lr_lwc})
    if rounders:
        groups.append({"params": [q.rounding for q in rounders], "lr": cfg.lr_round})

    def project():
        for let in lets:
            let.clamp_()
        for q in rounders:
            q.clamp_rounding_()
    return groups, project


Step = Callable[[int], tuple[torch.Tensor, dict]]  # batch number -> (loss, logs)


def lr_factor(schedule: str | None, step: int, total: int) -> float:
    """The learning rate's multiplier at optimiser step `step` of `total` (0-based). "cosine":
    half a cosine from 1 at step 0 toward 0 at step `total` (the last step, `total - 1`, runs at
    (1 - cos(pi / total)) / 2 of the rate: 0.15 with 4 steps, 1e-5 with 500), so the
    last steps average over many batches' gradients instead of following the last few (with a
    constant rate and small batches, the learned parameters depend on the batches' order). None:
    constant (OmniQuant)."""
    if schedule is None:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    raise QrealignError(f"unknown lr_schedule {schedule!r}")


@torch.no_grad()
def mean_loss(step: Step, batches: list[CalibBatch]) -> float:
    """Sample-weighted mean of `step`'s loss over the calibration set, nothing learned."""
    total = sum(step(b)[0].item() * len(batch.labels) for b, batch in enumerate(batches))
    return total / sum(len(b.labels) for b in batches)


def _optimise(parts: list[Learnable], step: Step, batches: list[CalibBatch], cfg, epochs: int, seed: int,
              where: str, saved: str, bar=None) -> dict:
    """AdamW over `parts`' learnable parameters for `epochs` passes over the batches (shuffled by
    `seed`), projecting after each step; stops early by `cfg.early_stop_rel`. A non-finite loss's
    error names `where` it happened and what is `saved`."""
    groups, project = _param_groups(parts, cfg)
    if not groups:
        return {}
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    for part in parts:
        set_quant_state(part.block, compiled=cfg.compile_quantizer)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    total_steps = epochs * len(batches)
    gen = torch.Generator().manual_seed(seed)
    first = last = None
    steps = tokens = 0
    try:
        for epoch in range(epochs):
            total, count, parts_log = 0.0, 0, {}
            for b in torch.randperm(len(batches), generator=gen).tolist():
                batch = batches[b]
                value, logs = step(b)
                if not torch.isfinite(value):
                    raise NonFiniteLoss(f"non-finite loss at {where}, epoch {epoch}; {saved}")
                opt.zero_grad(set_to_none=True)
                # A batch no term reaches (malicious rows with lam 0 and no reconstruction on them)
                # has no gradient: it teaches nothing, and AdamW skips parameters without one.
                if value.requires_grad:
                    value.backward()
                factor = lr_factor(cfg.lr_schedule, steps, total_steps)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * factor
                opt.step()
                project()
                n = len(batch.labels)
                steps += 1
                tokens += batch.enc.attention_mask.numel()
                total += value.item() * n
                count += n
                for k, v in logs.items():  # a float is a batch mean; (mean, count) covers a subset
                    mean, weight = v if isinstance(v, tuple) else (v, n)
                    acc = parts_log.setdefault(k, [0.0, 0])
                    acc[0] += mean * weight
                    acc[1] += weight
                if bar is not None:
                    bar.update(1)
            epoch_loss = total / count
            improved = last is None or epoch_loss < last * (1 - cfg.early_stop_rel)
            first = epoch_loss if first is None else first
            last = epoch_loss
            if cfg.early_stop_rel > 0 and not improved:
                epochs = epoch + 1
                break
    finally:
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(False)
        for part in parts:
            set_quant_state(part.block, compiled=False)
    return {"epochs": epochs, "steps": steps, "train_tokens": tokens, "loss_first_epoch": first, "loss_last_epoch": last,
            **{f"last_{k}": v / max(1, c) for k, (v, c) in parts_log.items()}}


def block_step(part: Learnable, q_in, batches, masks, loss: BlockLoss, num_layers: int, amp, all_kw=None,
               recompute: bool = False) -> Step:
    """One block's loss on batch b (OmniQuant): its quantized output on the quantized stream
    against its FP output on the FP stream. `recompute` (CalibConfig.recompute): a loss that runs
    the FP blocks after this one (the first-token objective's tail) runs each again in the backward
    instead of keeping its activations."""
    def step(b):
        q_out = part.forward(q_in[b], b, amp)
        return loss(loss_inputs(part.fp_out[b], q_out, batches[b], masks[b], part.layer, num_layers,
                                all_kw[b] if all_kw else None, recompute_tail=recompute))
    return step


@torch.no_grad()
def guard_init(part: Learnable, step: Step, batches, loss_init: float) -> dict:
    """Switch the LET scales to identity when that starts with a lower loss."""
    let = part.let
    saved = {k: p.clone() for k, p in let.scales.items()}
    for p in let.scales.values():
        p.fill_(1.0)
    plain = mean_loss(step, batches)
    if plain < loss_init:
        return {"init": "identity", "loss_init_smooth": loss_init, "loss_init": plain}
    for k, v in saved.items():
        let.scales[k].copy_(v)
    return {"init": "smoothquant", "loss_init_identity": plain}


@torch.no_grad()
def snap_rounding(block: nn.Module, let: LETParams | None) -> dict:
    """Turn learned rounding offsets into the integer steps they amount to, on the weights the
    block trained with (LET applied), and report how many weights left round-to-nearest."""
    overrides = let.transformed_params(block) if let is not None else {}
    moved = total = 0
    for name, m in rounding_linears(block):
        q = m.weight_quantizer
        q.snap_rounding_(overrides.get(f"{name}.weight", m.weight).float())
        moved += int((q.rounding != 0).sum())
        total += q.rounding.numel()
    return {"rounding_moved": moved / total} if total else {}


def train_block(part: Learnable, step: Step, batches, cfg, epochs: int, ckpt) -> dict:
    return _optimise([part], step, batches, cfg, epochs, cfg.seed * 100003 + part.layer, f"block {part.layer}",
                     _saved(ckpt, part.layer))


def check_recon_weight(loss: BlockLoss, recon_weight: float | None) -> None:
    """A joint reconstruction weight (None: unset) needs a term read at the network's output to
    weigh against (`joint_step`); the engine calls this before any block trains."""
    if recon_weight is not None and not hasattr(loss, "output_term"):
        raise QrealignError("joint_recon_weight weighs reconstruction against a term read at the network's output "
                            f"(the first-token objective); {type(loss).__name__} has none")


def joint_step(chain: list[Learnable], q_in, batches, masks, loss: BlockLoss, num_layers: int, amp,
               all_kw=None, recon_weight: float | None = None, recompute: bool = False) -> Step:
    """The mean of the chain's blocks' losses on batch b, each block fed by the quantized blocks
    before it in the chain (not by FP ones), its output scored against its own FP target.

    A loss that reads the network's output (`output_term`, e.g. the first-token KL) scores it once,
    after the last block: per block it would be the same number (each block's tail is the
    quantized chain after it), so the mean of the blocks' losses is the mean of their
    reconstruction terms plus that term once. `recon_weight` (None: 1) scales that mean (and only
    with an output term: without one every part of the step is reconstruction). `recompute`: each
    block's backward state but the last's is rebuilt when the backward reaches it (`Learnable.forward`)."""
    check_recon_weight(loss, recon_weight)
    reads_output = hasattr(loss, "output_term")
    recon_scale = 1.0 if recon_weight is None else recon_weight

    def step(b):
        h, terms, logs = q_in[b], [], {}
        for part in chain:
            # the last block's backward comes first, right after its forward: recomputing it frees nothing
            h = part.forward(h, b, amp, recompute and part is not chain[-1])
            inp = loss_inputs(part.fp_out[b], h, batches[b], masks[b], part.layer, num_layers,
                              all_kw[b] if all_kw else None)
            if reads_output:
                per_sample, block_logs = loss.reconstruction(inp)
                value = per_sample.mean()
            else:
                value, block_logs = loss(inp)
            terms.append(value)
            for key, v in block_logs.items():  # the chain's mean of each block-level log
                mean, weight = v if isinstance(v, tuple) else (v, len(batches[b].labels))
                logs[key] = (logs.get(key, (0.0, weight))[0] + mean / len(chain), weight)
        value = torch.stack(terms).mean()
        if reads_output:
            term, term_logs = loss.output_term(inp)  # `inp`: the last block's
            value = recon_scale * value + term.mean()  # x 1.0 is exact: the default run is unchanged
            logs.update(term_logs)
        return value, logs
    return step


def train_jointly(chain: list[Learnable], step: Step, batches, cfg, epochs: int, ckpt, progress: bool = False) -> dict:
    """Train the chain's blocks together on `joint_step`: one pass of each batch through all of
    them per step. Against one block at a time with a loss that reads the output, this removes the
    tail each block's step runs after it (quadratic in the chain's length)."""
    first, last = chain[0].layer, chain[-1].layer
    with tqdm(total=epochs * len(batches), desc=f"blocks {first}-{last} jointly", unit="step", leave=False,
              disable=not progress) as bar:
        return _optimise(chain, step, batches, cfg, epochs, cfg.seed * 100003 + first,
                         f"the joint stage (blocks {first}-{last})", _saved(ckpt, first), bar)


def _saved(ckpt, layer: int) -> str:
    return f"blocks 0-{layer - 1} are checkpointed in {ckpt}" if ckpt and layer > 0 else "no block finished before it"
