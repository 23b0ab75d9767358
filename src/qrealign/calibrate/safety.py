"""The Q-realign objective: quantization with a safety term (paper §3.4).

Per calibration sample, at block l:
    benign    -> reconstruction MSE to the FP fine-tuned block output
    malicious -> softplus(-(w_l . h_t + b_l)), h_t = the quantized block's output at the last
                 prompt token, (w_l, b_l) = the frozen probe of layer l (label 1 = the side to
                 push towards: "harmful" for the paper's probe, "aligned" for contrast probes).
The batch loss is the mean of the per-sample losses; with the defaults this is exactly the
paper's objective (no lambda: the balance comes from the malicious ratio of the calibration set).

Options the paper's own limitations ask for: `lam` (weight of the safety term), reconstruction on
malicious samples too, a margin (and a hinge form) that stops pushing once a sample is past it,
restricting the safety term to some layers (others fall back to reconstruction on every sample),
a normalised MSE and a down-weighted attention-sink position (comparable scales across layers),
and a benign-side term that keeps benign prompts on the benign side (against over-refusal).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import QrealignError
from ..utils import tensor_digest
from .losses import LossInputs, SafetyGate, check_weights


@dataclass
class SafetyLoss(SafetyGate):
    w: torch.Tensor  # [L, d]
    b: torch.Tensor  # [L]
    layers: tuple[int, ...] | None = None  # None = every layer whose probe is usable
    usable: tuple[bool, ...] | None = None
    lam: float = 1.0
    recon_on_malicious: bool = False
    margin: float = 0.0
    probe_loss: str = "softplus"  # "softplus" (paper) or "hinge"
    normalize: bool = False
    sink_weight: float = 1.0
    benign_side: float = 0.0
    benign_margin: float = 0.0
    include_padding: bool = False  # the authors' MSE averages over pad positions too
    probe_id: str = ""  # the probe set's fingerprint, for run fingerprints and metadata
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.probe_loss not in ("softplus", "hinge"):
            raise QrealignError("probe_loss must be 'softplus' or 'hinge'")
        # a negative weight turns a term around (lam < 0 pushes malicious prompts to the benign side)
        check_weights(**{name: getattr(self, name) for name in ("lam", "sink_weight", "benign_side", "benign_margin")})
        if not math.isfinite(self.margin):
            raise QrealignError(f"margin must be finite, got {self.margin}")
        if not self.probe_id:  # built from tensors: other weights must give another run fingerprint
            self.probe_id = "weights:" + _weights_digest(self.w, self.b)

    @classmethod
    def from_probes(cls, probes, **options) -> "SafetyLoss":
        """From a `qrealign.probes.ProbeSet`: unusable layers never get the safety term."""
        # The weights' hash too: re-fitted probes must not resume blocks trained against old ones.
        probe_id = probes.model.get("fingerprint", "") + ":" + probes.target + ":" + _weights_digest(probes.w, probes.b)
        return cls(probes.w.float(), probes.b.float(), usable=tuple(probes.usable), probe_id=probe_id, **options)

    def active(self, layer: int) -> bool:
        return (self.usable is None or self.usable[layer]) and super().active(layer)

    def probe_logits(self, inp: LossInputs) -> torch.Tensor:
        h = inp.q_out[torch.arange(inp.q_out.shape[0], device=inp.q_out.device), inp.last_index]
        key = (inp.layer, h.device)
        if key not in self._cache:
            self._cache[key] = (self.w[inp.layer].to(h.device), self.b[inp.layer].to(h.device))
        w, b = self._cache[key]
        return h.float() @ w + b

    def _push(self, z: torch.Tensor, margin: float) -> torch.Tensor:
        return F.softplus(margin - z) if self.probe_loss == "softplus" else F.relu(margin - z)

    def __call__(self, inp: LossInputs):
        malicious = inp.labels.bool()
        per_sample, logs = self.reconstruction(inp)
        if not self.active(inp.layer):
            return per_sample.mean(), logs
        z = self.probe_logits(inp)
        if malicious.any():
            push = self.lam * self._push(z[malicious], self.margin)
            per_sample[malicious] = per_sample[malicious] + push
            logs["probe"] = (push.mean().item(), int(malicious.sum()))
            logs["z_mal"] = (z[malicious].mean().item(), int(malicious.sum()))
        if self.benign_side and (~malicious).any():
            keep = self.benign_side * F.softplus(z[~malicious] + self.benign_margin)
            per_sample[~malicious] = per_sample[~malicious] + keep
            logs["z_ben"] = (z[~malicious].mean().item(), int((~malicious).sum()))
        return per_sample.mean(), logs

    def __repr__(self) -> str:  # short and stable: it enters the run fingerprint
        return (f"SafetyLoss(probe={self.probe_id}, layers={self.layers}, lam={self.lam}, "
                f"recon_on_malicious={self.recon_on_malicious}, margin={self.margin}, probe_loss={self.probe_loss}, "
                f"normalize={self.normalize}, sink_weight={self.sink_weight}, benign_side={self.benign_side}, "
                f"benign_margin={self.benign_margin}, include_padding={self.include_padding}, usable={self.usable})")


def _weights_digest(w: torch.Tensor, b: torch.Tensor) -> str:
    h = hashlib.sha256()
    tensor_digest(w, h)
    tensor_digest(b, h)
    return h.hexdigest()[:12]
