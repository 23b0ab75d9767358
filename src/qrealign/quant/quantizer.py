"""Uniform integer fake quantization with a straight-through estimator (OmniQuant numerics).

Weights: per output channel or per group, with Learnable Weight Clipping (LWC): the range
[min, max] of each row/group is shrunk by sigmoid(gamma), sigmoid(beta), initialised at
sigmoid(4) ~ 0.982. Activations: per-token dynamic min-max (the paper's setting), or a static
per-tensor range observed on calibration data.

Learnable rounding (optional, AutoRound-style): a per-weight offset V in [-0.5, 0.5] added before
rounding, round(w / s + V), lets calibration choose floor or ceil for every weight instead of the
nearest grid point. Once trained it is snapped to the integer it amounts to,
round(w / s + V) - round(w / s) in {-1, 0, 1}, and stored as int8.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from ..errors import QrealignError
from .scheme import QuantArgs

SCALE_MIN, SCALE_MAX = 1e-5, 1e4
LWC_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def qparams(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs,
            hold_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for a range. Gradients flow through the scale (as in
    OmniQuant); the zero point is rounded without STE.

    `hold_zero` widens an asymmetric range to hold 0, as compressed-tensors' observers do: its
    checkpoints store a weight's zero point among the codes, and a same-sign row or small group
    (or a row whose LWC factors crossed) would otherwise get a zero point outside them, or a scale
    and zero point at their clamps that dequantize to garbage (review 67). Ranges that hold 0
    already (every per-channel row of a real model) are unchanged, bit for bit and in gradient.
    Dynamic per-token activations keep the plain range, as vLLM's asymmetric int8 kernel does
    (its zero point is an int32 and may lie outside the codes)."""
    if not args.symmetric and hold_zero:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if args.symmetric:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (absmax / args.qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.zeros_like(scale)
    else:
        scale = ((xmax - xmin) / (args.qmax - args.qmin)).clamp(SCALE_MIN, SCALE_MAX)
        zero = (-xmin / scale).clamp(-1e4, 1e4).round().detach()
    return scale, zero


def _on_grid(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """x in units of the quantization step, shifted by a learned rounding offset if there is one."""
    return x / scale if offset is None else x / scale + offset


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    q = torch.clamp(round_ste(_on_grid(x, scale, offset)) + zero, args.qmin, args.qmax)
    return (q - zero) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
    """The integer codes (for export): same grid and rounding as `fake_quant`."""
    return torch.clamp(torch.round(_on_grid(x, scale, offset)) + zero, args.qmin, args.qmax)


def _weight_qparams(g: torch.Tensor, up: torch.Tensor | None, low: torch.Tensor | None,
                    args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of the grouped weight `g`, its range shrunk by LWC's
    sigmoid factors when there are any."""
    xmax = g.amax(dim=1, keepdim=True)
    xmin = g.amin(dim=1, keepdim=True)
    if up is not None:
        xmax = torch.sigmoid(up) * xmax
        xmin = torch.sigmoid(low) * xmin
    return qparams(xmin, xmax, args, hold_zero=True)


def _weight_fake_quant(g: torch.Tensor, up: torch.Tensor | None, low: torch.Tensor | None,
                       rounding: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """The weight fake-quantizer as one pure function of tensors, so torch.compile can fuse it."""
    scale, zero = _weight_qparams(g, up, low, args)
    return fake_quant(g, scale, zero, args, rounding)


def _per_token_fake_quant(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Per-token dynamic fake quantization, training path (gradients through the range). The
    scale and the codes are computed in float32 whatever the input's dtype: serving engines
    (vLLM's int8 kernels) read bf16 activations and do this arithmetic in float32, and in bf16 a
    few per cent of the codes (a third, asymmetric) would land one to three steps off. The
    dequantized value is then cast back to the input's dtype, and bf16 cannot hold code x scale
    for large codes: up to half a step off the grid (review 67), where an int8 kernel is exact.
    A bf16 evaluation is therefore close to, not equal to, the exported model; float32 is exact."""
    xf = x.float()
    scale, zero = qparams(xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), args)
    return fake_quant(xf, scale, zero, args).to(x.dtype)


_COMPILED: dict = {}


def check_compiler(device, demo: bool = False) -> None:
    """`torch.compile` on CPU builds C++ kernels; without a compiler it fails at the first compiled
    step, after all the work before it (a demo's lab). Checked up front instead; there is no
    fallback to eager, which would be another run (the switch is in the fingerprint). `demo`: the
    demo's first-token rows, measured compiled, have no switch to name."""
    way_out = (" (the demo's first-token rows were measured with it: it has no switch there)" if demo else
               ", or switch the option off (CLI --no-compile-quantizer; another run: last-bit differences)")
    what = "compile_quantizer (--compile-quantizer; the demo's first-token rows) runs torch.compile, "
    if torch.device(device).type == "cuda":  # GPU kernels are Triton's
        if not _has_triton():
            raise QrealignError(what + "whose CUDA kernels need Triton, which torch cannot use here (not installed, "
                                "or a GPU older than compute capability 7.0): install it (pip install triton)"
                                + way_out)
        return
    if torch.device(device).type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the compile itself will say
        return
    try:
        get_cpp_compiler()
    except Exception:
        raise QrealignError(what + "which needs a C++ compiler on CPU: install g++ or clang++ (Debian/Ubuntu: apt "
                            "install g++) or point CXX at one" + way_out) from None
    # Its CPU kernels are built as Python extensions (#include <Python.h>): the headers too (review 70).
    if not any((Path(d) / "Python.h").is_file() for d in _python_include_dirs()):
        raise QrealignError(what + "which on CPU builds Python extensions and needs the Python headers (Python.h): "
                            "install them (Debian/Ubuntu: apt install python3-dev)" + way_out)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # another torch layout: the compile itself will say
        return True
    return has_triton()


def _python_include_dirs() -> list[str]:
    """Where torch's C++ builder looks for Python.h (its own rule when this torch has it)."""
    import sysconfig
    import warnings

    try:
        from torch._inductor.cpp_builder import _get_python_include_dirs
    except ImportError:
        return [sysconfig.get_path("include")]
    with warnings.catch_warnings():  # it warns when the header is missing: we raise instead
        warnings.simplefilter("ignore")
        return _get_python_include_dirs()


def _compiled(name: str, fn):
    """`fn` under torch.compile, built once per process. Calibration spends most of a step in the
    fake-quantizers' elementwise work, not in the matmuls (docs/performance.md: 2.79x on the
    weight quantizer's forward + backward, 2.54x on the activations', one CPU thread); fused, the
    quantized values are bit-identical to eager, some gradients differ in the last bits, so the
    option is part of the run fingerprint."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


class WeightQuantizer(nn.Module):
    """Fake-quantizes a [out, in] weight per row or per group of `group_size` input columns."""

    def __init__(self, args: QuantArgs, shape: torch.Size, lwc: bool = True, device=None, init: float = LWC_INIT,
                 rounding: bool = False):
        super().__init__()
        self.args = args
        out_features, in_features = shape
        if args.strategy == "group" and in_features % args.group_size:
            fits = [g for g in (256, 128, 64, 32) if in_features % g == 0]
            raise QrealignError(f"weight group size {args.group_size} does not divide this model's input width "
                                f"{in_features}; use a scheme whose group divides it"
                                + (f", e.g. -g{fits[0]} in the scheme's name (W4A16-g{fits[0]}; a name's -gN sets "
                                   "the group, W4A16 alone is -g128)" if fits else ""))
        rows = out_features * (in_features // args.group_size if args.strategy == "group" else 1)
        self.lwc = lwc
        if lwc:
            self.upbound_factor = nn.Parameter(torch.full((rows, 1), float(init), device=device))
            self.lowbound_factor = nn.Parameter(torch.full((rows, 1), float(init), device=device))
        # Per-weight rounding offset, laid out like the grouped weight; 0 = round to nearest.
        self.rounding = (nn.Parameter(torch.zeros(rows, out_features * in_features // rows, device=device))
                         if rounding else None)
        # Calibration may run the fake-quantizer through torch.compile (`CalibConfig.compile_quantizer`):
        # a plain attribute, not state, so checkpoints and exports do not see it.
        self.compiled = False

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        if self.args.strategy == "group":
            return w.reshape(-1, self.args.group_size)
        return w.reshape(w.shape[0], -1)

    def _bounds(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.upbound_factor, self.lowbound_factor) if self.lwc else (None, None)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _weight_qparams(self._grouped(w), *self._bounds(), self.args)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fn = _compiled("weight", _weight_fake_quant) if self.compiled else _weight_fake_quant
        return fn(self._grouped(w), *self._bounds(), self.rounding, self.args).reshape(w.shape)

    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer codes of the grouped weight, scale, zero): what `forward` dequantizes."""
        scale, zero = self.params(w)
        return quantize_int(self._grouped(w), scale, zero, self.args, self.rounding), scale, zero

    @torch.no_grad()
    def rounding_as_int8_(self) -> None:
        """Hold snapped offsets (-1 / 0 / +1 steps, as a run stores them) as an int8 buffer: one byte
        per weight instead of four for an exporter that only computes codes. The same codes: the
        grid adds the offset in float32 either way."""
        if isinstance(self.rounding, nn.Parameter):
            steps = self.rounding.detach().to(torch.int8)
            if not torch.equal(steps.float(), self.rounding.detach().float()):
                raise ValueError("learned rounding offsets are not whole steps (snap them first)")
            del self.rounding
            self.register_buffer("rounding", steps)

    @torch.no_grad()
    def clamp_rounding_(self) -> None:
        if self.rounding is not None:
            self.rounding.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def snap_rounding_(self, w: torch.Tensor) -> None:
        """Replace the learned offsets by the integer step each one amounts to for weight `w`
        (-1, 0 or +1 from round-to-nearest): the same codes, storable as int8."""
        if self.rounding is None:
            return
        scale, _ = self.params(w)
        y = self._grouped(w) / scale
        self.rounding.copy_(torch.round(y + self.rounding) - torch.round(y))


class ActQuantizer(nn.Module):
    """Per-token dynamic (range of each token's vector) or static per-tensor fake quantization."""

    def __init__(self, args: QuantArgs):
        super().__init__()
        self.args = args
        self.observing = False
        self.compiled = False  # as WeightQuantizer.compiled: the training path under torch.compile
        self.register_buffer("static_min", None)
        self.register_buffer("static_max", None)

    def observe(self, on: bool = True) -> None:
        """For static schemes: while observing, widen the stored range and pass x through."""
        self.observing = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.args.dynamic and not (torch.is_grad_enabled() and x.requires_grad):
            return _per_token_no_grad(x, self.args)
        if self.args.dynamic:
            fn = _compiled("act", _per_token_fake_quant) if self.compiled else _per_token_fake_quant
            return fn(x, self.args)
        else:
            if self.observing:
                lo, hi = x.detach().amin(), x.detach().amax()
                self.static_min = lo if self.static_min is None else torch.minimum(self.static_min, lo)
                self.static_max = hi if self.static_max is None else torch.maximum(self.static_max, hi)
                return x
            if self.static_min is None:
                raise RuntimeError("static activation quantizer used before observing calibration data")
            xmin, xmax = self.static_min, self.static_max
        scale, zero = qparams(xmin, xmax, self.args, hold_zero=True)  # a static scale is a checkpoint's too
        return fake_quant(x, scale, zero, self.args)


# Inference path of the per-token quantizer. Generation calls it for every linear at every decoding
# step on a handful of tokens, so its cost is the number of small kernel launches, not arithmetic:
# one fused min/max, in-place arithmetic, and q/k/v (gate/up) that read the same input tensor
# quantize it once. Same `qparams` and the same order of operations as `fake_quant`, so the result
# is bit-identical to the training path (tests/test_quantizer.py checks it).
_NO_MEMO: tuple = (None, -1, None, None, -1)
_last: tuple = _NO_MEMO  # weakref to the input, its version, args, output, its version


def _forget(ref) -> None:
    """The memoised input died: drop its quantized copy too (it would otherwise outlive the run)."""
    global _last
    if _last[0] is ref:
        _last = _NO_MEMO


def _per_token_no_grad(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    global _last
    # Inference-mode tensors (inputs, or outputs made under inference mode) have no version counter.
    memo = not (torch.is_inference_mode_enabled() or x.is_inference())
    ref, version, last_args, out, out_version = _last
    if (memo and ref is not None and ref() is x and version == x._version and last_args == args
            and out._version == out_version):
        return out
    with torch.no_grad():
        xf = x.float()  # a no-op in float32; bf16/fp16 inputs are quantized in float32, as engines do
        scale, zero = qparams(*torch.aminmax(xf, dim=-1, keepdim=True), args)
        q = xf.div(scale).round_().add_(zero).clamp_(args.qmin, args.qmax).sub_(zero).mul_(scale).to(x.dtype)
    if memo:
        _last = (weakref.ref(x, _forget), x._version, args, q, q._version)
    return q
