"""Integer codes, scales and zero points of one QuantLinear, on the grid it was calibrated on.

Input is the folded FP weight (LET already in it) and the weight quantizer with its learned
clipping (LWC) and any learned rounding: `codes(w)` gives the integer codes, scale and zero point,
exactly as the fake-quant forward computes them. compressed-tensors stores integers in the
signed range [-2^(b-1), 2^(b-1)-1]; qrealign's asymmetric grid is unsigned [0, 2^b-1], so codes
and zero points shift by 2^(b-1), which leaves (q - z) * scale, the dequantized weight, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.qlinear import QuantLinear
from ..quant.quantizer import WeightQuantizer
from ..quant.scheme import QuantArgs
from .plan import ExportError


@dataclass
class LinearCodes:
    scale: torch.Tensor               # [out, groups] float32
    zero_point: torch.Tensor | None   # [out, groups] signed zero points (asymmetric only)
    dequantized: torch.Tensor         # [out, in] float32: (q - z) * scale, what the checkpoint decodes to


@torch.no_grad()
def linear_codes(name: str, module: QuantLinear, args: QuantArgs) -> LinearCodes:
    """Codes for `module` on grid `args` (its own args, or a symmetric variant of them)."""
    quantizer = module.weight_quantizer
    if quantizer is None:
        raise ExportError(f"{name} has no weight quantizer")
    w = module.weight.detach().float()
    if args != quantizer.args:  # same learned clipping, other grid (symmetric re-quantization)
        # Learned rounding offsets belong to the calibrated grid; on another grid they mean
        # nothing, so the re-quantization rounds to nearest (it is inexact anyway).
        other = WeightQuantizer(args, w.shape, lwc=quantizer.lwc, device=w.device)
        other.load_state_dict({k: v for k, v in quantizer.state_dict().items() if k != "rounding"})
        quantizer = other
    out_features, in_features = w.shape
    q, scale, zero = quantizer.codes(w)
    dequantized = ((q - zero) * scale).reshape(out_features, in_features)
    scale = scale.reshape(out_features, -1)
    if args.symmetric:
        return LinearCodes(scale, None, dequantized)
    offset = 2 ** (args.num_bits - 1)
    zp = (zero - offset).reshape(out_features, -1)
    if zp.min() < -offset or zp.max() > offset - 1:
        raise ExportError(
            f"{name}: a {'group' if args.strategy == 'group' else 'row'} whose clipped range does not contain 0 "
            f"has zero point outside the {args.num_bits}-bit range; compressed-tensors cannot store it "
            f"(export with --symmetric-weights or calibrate a -sym scheme)")
    return LinearCodes(scale, zp, dequantized)

