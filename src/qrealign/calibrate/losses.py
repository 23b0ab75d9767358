"""Block-wise calibration losses.

A loss receives a `LossInputs` (FP target, quantized output, labels, masks, last-prompt-token
index, layer) and returns (scalar loss, logs). Every loss is a mean over samples of a
per-sample loss, and padding positions never count, so batch size and padding side do not
change its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import QrealignError


def check_weights(positive: tuple[str, ...] = (), **weights: float | None) -> None:
    """Loss weights must be finite and >= 0 (those named in `positive` > 0); None = not set. A
    negative weight turns a term around, and NaN passes a `< 0` check to fail only at a training
    step, after minutes of work."""
    for name, value in weights.items():
        if value is None:
            continue
        bound = "> 0" if name in positive else ">= 0"
        if not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            raise QrealignError(f"{name} must be a finite number {bound}, got {value}")


@dataclass
class LossInputs:
    fp_out: torch.Tensor | None  # [B, T, d] FP fine-tuned block output (None if no sample needs it)
    q_out: torch.Tensor  # [B, T, d] quantized block output
    labels: torch.Tensor  # [B] 1 = malicious, 0 = benign
    attention_mask: torch.Tensor  # [B, T]
    last_index: torch.Tensor  # [B]
    layer: int
    num_layers: int
    # For losses that look past the block (calibrate.behaviour): each row's position in the
    # CalibrationSet, and the kwargs the decoder blocks take, by attention type.
    index: torch.Tensor | None = None
    block_kwargs: dict | None = None
    # CalibConfig.recompute, block by block: a loss that runs the FP blocks after this one keeps
    # only each one's input for the backward and runs it again there (the same gradients).
    recompute_tail: bool = False


class BlockLoss(Protocol):
    """Returns (loss, logs). A log value is a float (a mean over the batch) or a (mean, count)
    pair when it covers only some samples (e.g. one class), so the engine averages it right."""

    def __call__(self, inp: LossInputs) -> tuple[torch.Tensor, dict[str, float | tuple[float, int]]]: ...

    def needs_fp(self, labels: torch.Tensor, layer: int) -> torch.Tensor:
        """[B] bool: which samples read the FP target (the engine skips the FP stream otherwise)."""
        ...


def token_weights(attention_mask: torch.Tensor, sink_weight: float = 1.0, include_padding: bool = False
                  ) -> torch.Tensor:
    """[B, T] weights over real tokens (every position with `include_padding`); the first real
    token of each row (the attention sink, whose massive activations dominate the MSE in later
    layers) gets `sink_weight`, wherever padding puts it."""
    w = torch.ones_like(attention_mask, dtype=torch.float) if include_padding else attention_mask.float()
    if sink_weight != 1.0:
        first = attention_mask.long().argmax(dim=1)
        w = w.clone()
        w[torch.arange(w.shape[0], device=w.device), first] *= sink_weight
    return w


def per_sample_mse(fp_out: torch.Tensor, q_out: torch.Tensor, attention_mask: torch.Tensor,
                   normalize: bool = False, sink_weight: float = 1.0, include_padding: bool = False) -> torch.Tensor:
    """[B] mean squared error over each sample's real tokens (and hidden dims). With
    `normalize`, divided by the target's mean square over the same tokens, so the value is a
    relative error comparable across layers (a meaningful lambda). `include_padding` reproduces
    the authors' loss, which averages over pad positions too."""
    w = token_weights(attention_mask, sink_weight, include_padding)
    err = (q_out.float() - fp_out.float()).pow(2).mean(dim=-1)  # [B, T]
    denom = w.sum(dim=1).clamp(min=1e-6)
    mse = (err * w).sum(dim=1) / denom
    if normalize:
        ms = (fp_out.float().pow(2).mean(dim=-1) * w).sum(dim=1) / denom
        mse = mse / ms.clamp(min=1e-12)
    return mse


class SafetyGate:
    """What the safety objectives share: the safety term acts on some blocks (`active`); the other
    blocks, and benign rows (malicious rows too with `recon_on_malicious`), keep the reconstruction
    MSE. For dataclasses with `layers`, `recon_on_malicious`, `normalize`, `sink_weight` and
    `include_padding` fields."""

    def active(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def needs_fp(self, labels: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.active(layer) or self.recon_on_malicious:
            return torch.ones_like(labels, dtype=torch.bool)
        return labels == 0

    def reconstruction(self, inp: LossInputs) -> tuple[torch.Tensor, dict]:
        """[B] per-sample MSE on the rows that keep reconstruction (0 on the others), and its log."""
        rows = ~inp.labels.bool() | self.recon_on_malicious | (not self.active(inp.layer))
        per_sample = torch.zeros(inp.q_out.shape[0], device=inp.q_out.device)
        if not rows.any():
            return per_sample, {}
        mse = per_sample_mse(inp.fp_out[rows], inp.q_out[rows], inp.attention_mask[rows], self.normalize,
                             self.sink_weight, self.include_padding)
        per_sample[rows] = mse
        return per_sample, {"mse": (mse.mean().item(), int(rows.sum()))}


@dataclass
class ReconstructionLoss:
    """OmniQuant's objective: MSE to the FP block output, on every sample."""

    normalize: bool = False
    sink_weight: float = 1.0
    include_padding: bool = False

    def needs_fp(self, labels: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.ones_like(labels, dtype=torch.bool)

    def __call__(self, inp: LossInputs):
        mse = per_sample_mse(inp.fp_out, inp.q_out, inp.attention_mask, self.normalize, self.sink_weight,
                             self.include_padding)
        loss = mse.mean()
        return loss, {"mse": loss.item()}


LossFactory = Callable[..., BlockLoss]
