"""A drop-in nn.Linear that fake-quantizes its weight and its input activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import LWC_INIT, ActQuantizer, WeightQuantizer
from .scheme import Scheme


class QuantLinear(nn.Module):
    """Holds the FP weight (possibly LET-transformed at call time via functional_call) and applies
    weight fake-quant (with LWC) and per-token activation fake-quant in forward.

    After calibration `freeze()` stores the fake-quantized weight once, so inference does not
    re-quantize every call."""

    def __init__(self, linear: nn.Linear, scheme: Scheme, lwc: bool = True, lwc_init: float = LWC_INIT,
                 rounding: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
                     if linear.bias is not None else None)
        device = linear.weight.device
        self.weight_quantizer = (WeightQuantizer(scheme.weights, self.weight.shape, lwc=lwc, device=device,
                                                 init=lwc_init, rounding=rounding)
                                 if scheme.weights else None)
        self.act_quantizer = ActQuantizer(scheme.activations) if scheme.activations else None
        self.quant_weight = True
        self.quant_act = True
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.weight_quantizer is not None and self.quant_weight and not self.frozen:
            w = self.weight_quantizer(w.float()).to(w.dtype)
        if self.act_quantizer is not None and self.quant_act:
            x = self.act_quantizer(x)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the weight by its fake-quantized value (the learned clipping applied).

        Learned rounding offsets are dropped then: they are in the frozen weight (and, for a run
        being saved, in its int8 parameters already), and kept they would cost one weight-sized
        tensor per linear for the rest of the model's life (a 7B model's size again in bf16)."""
        if self.weight_quantizer is not None and not self.frozen:
            self.weight.copy_(self.weight_quantizer(self.weight.float()).to(self.weight.dtype))
            self.weight_quantizer.rounding = None
        self.frozen = True

    def extra_repr(self) -> str:
        w = self.weight_quantizer.args.num_bits if self.weight_quantizer else 16
        a = self.act_quantizer.args.num_bits if self.act_quantizer else 16
        return f"in={self.in_features}, out={self.out_features}, W{w}A{a}, frozen={self.frozen}"


def wrap_linears(block: nn.Module, names: tuple[str, ...], scheme: Scheme, lwc: bool,
                 lwc_init: float = LWC_INIT, rounding: bool = False) -> dict[str, QuantLinear]:
    """Swap the named nn.Linear modules of a block for QuantLinear, in place."""
    wrapped = {}
    for name in names:
        linear = block.get_submodule(name)
        if isinstance(linear, QuantLinear):
            wrapped[name] = linear
            continue
        qlinear = QuantLinear(linear, scheme, lwc=lwc, lwc_init=lwc_init, rounding=rounding)
        block.set_submodule(name, qlinear)
        wrapped[name] = qlinear
    return wrapped


def set_quant_state(module: nn.Module, weight: bool | None = None, act: bool | None = None,
                    compiled: bool | None = None) -> None:
    """Switch weight / activation fake-quantization, or their torch.compile'd training path, on
    every QuantLinear under `module` (None leaves that setting as it is)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            if weight is not None:
                m.quant_weight = weight
            if act is not None:
                m.quant_act = act
            if compiled is not None:
                for q in (m.weight_quantizer, m.act_quantizer):
                    if q is not None:
                        q.compiled = compiled
