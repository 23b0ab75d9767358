"""Quantization schemes as data (compressed-tensors' QuantizationArgs in spirit).

A scheme is two `QuantArgs`: weights and input activations (None = keep that side in floating
point). Presets are named; custom schemes parse from strings like "W4A8-g128-sym" or come
from a dict, and every scheme round-trips through `to_dict`/`from_dict` into run metadata.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from ..errors import QrealignError


@dataclass(frozen=True)
class QuantArgs:
    num_bits: int = 8
    symmetric: bool = False
    # weights: "channel" (per output row) or "group"; activations: "token" (dynamic) or "tensor" (static)
    strategy: str = "channel"
    group_size: int | None = None
    dynamic: bool = True

    def __post_init__(self):
        if not 2 <= self.num_bits <= 16:
            raise QrealignError(f"num_bits must be in [2, 16], got {self.num_bits}")
        if self.strategy not in ("channel", "group", "token", "tensor"):
            raise QrealignError(f"unknown strategy {self.strategy!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise QrealignError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.strategy == "group" and not self.group_size:
            raise QrealignError("strategy 'group' needs a group_size")
        if self.strategy != "group" and self.group_size is not None:  # it would be ignored without a word
            raise QrealignError(f"group_size {self.group_size} applies to strategy 'group', not {self.strategy!r}")
        if not self.symmetric and self.num_bits > 13:  # the zero point is clamped to +-1e4 (as OmniQuant)
            raise QrealignError(f"asymmetric {self.num_bits}-bit quantization is not supported (its zero point "
                                "would leave the +-1e4 range it is kept in); use at most 13 bits or symmetric")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1 if self.symmetric else 2 ** self.num_bits - 1


@dataclass(frozen=True)
class Scheme:
    name: str
    weights: QuantArgs | None
    activations: QuantArgs | None

    def __post_init__(self):
        # the quantizers branch on these alone (weights: group or not; activations: dynamic or
        # not), so a strategy that does not fit its role would silently run as another one
        if self.weights is not None and self.weights.strategy not in ("channel", "group"):
            raise QrealignError(f"scheme {self.name!r}: weights are quantized per 'channel' or per 'group', "
                                f"not per {self.weights.strategy!r}")
        a = self.activations
        if a is not None and (a.strategy, a.dynamic) not in (("token", True), ("tensor", False)):
            raise QrealignError(f"scheme {self.name!r}: activations are quantized per 'token' (dynamic) or per "
                                f"'tensor' (static), not per {a.strategy!r} with dynamic={a.dynamic}")

    @property
    def min_bits(self) -> int:
        bits = [a.num_bits for a in (self.weights, self.activations) if a is not None]
        return min(bits) if bits else 16

    def to_dict(self) -> dict:
        return {"name": self.name,
                "weights": asdict(self.weights) if self.weights else None,
                "activations": asdict(self.activations) if self.activations else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        if not isinstance(d, dict) or "name" not in d:
            raise QrealignError(f"a scheme given as data needs 'name', 'weights' and 'activations' keys, got {d!r}")
        return cls(d["name"],
                   QuantArgs(**d["weights"]) if d.get("weights") else None,
                   QuantArgs(**d["activations"]) if d.get("activations") else None)


def _w(bits, group=None, sym=False):
    if group:
        return QuantArgs(bits, sym, "group", group)
    return QuantArgs(bits, sym, "channel")


def _a(bits, sym=False):
    return QuantArgs(bits, sym, "token", None, True)


PRESETS: dict[str, Scheme] = {
    # Paper settings: asymmetric per-channel weights, asymmetric per-token dynamic activations.
    "W8A8": Scheme("W8A8", _w(8), _a(8)),
    "W4A8": Scheme("W4A8", _w(4), _a(8)),
    "W4A4": Scheme("W4A4", _w(4), _a(4)),
    "W8A16": Scheme("W8A16", _w(8), None),
    "W4A16": Scheme("W4A16", _w(4, group=128), None),
    # What serving engines run (compressed-tensors INT8_W8A8): symmetric weights and symmetric
    # dynamic per-token activations. Calibrate with this one when the export must be exact.
    "W8A8-sym": Scheme("W8A8-sym", _w(8, sym=True), _a(8, sym=True)),
    "W4A16-sym": Scheme("W4A16-sym", _w(4, group=128, sym=True), None),
}

# Weight-only schemes of at most 4 bits are grouped unless the name says -g<N>: per-channel 4-bit
# weights without the activations' bits to spare lose too much (GPTQ, AWQ and the presets use 128).
_WEIGHT_ONLY_GROUP = 128

_PATTERN = re.compile(r"^W(\d+)A(\d+)((?:-(?:g\d+|sym|wsym|asym-act))*)$", re.IGNORECASE)


def get_scheme(spec: str | dict | Scheme) -> Scheme:
    """A preset name, a custom string ("W4A8-g128-sym"), a dict, or a Scheme."""
    if isinstance(spec, Scheme):
        return spec
    if isinstance(spec, dict):
        return Scheme.from_dict(spec)
    if not isinstance(spec, str):
        raise QrealignError(f"a scheme is a name, a dict or a Scheme, got {type(spec).__name__}")
    spec = spec.strip()
    preset = {name.lower(): scheme for name, scheme in PRESETS.items()}.get(spec.lower())
    if preset is not None:  # "w8a8" is W8A8: one name per scheme, so per-scheme settings find it
        return preset
    match = _PATTERN.match(spec)
    if not match:
        raise QrealignError(
            f"unknown scheme {spec!r}; presets: {', '.join(PRESETS)}; "
            "custom: W<bits>A<bits>[-g<group>][-sym|-wsym][-asym-act]"
        )
    wbits, abits, suffix = int(match[1]), int(match[2]), match[3].lower()
    for bits, what in ((wbits, "W"), (abits, "A")):
        if not 2 <= bits <= 16:
            raise QrealignError(f"scheme {spec!r}: {what}{bits}: bits must be 2..16 (16: not quantized)")
    if wbits == 16 and abits == 16:
        raise QrealignError(f"scheme {spec!r} quantizes nothing (16-bit weights and activations)")
    options = ["g" if o.startswith("g") else o for o in re.findall(r"-(g\d+|sym|wsym|asym-act)", suffix)]
    repeated = sorted({o for o in options if options.count(o) > 1})
    if repeated:
        raise QrealignError(f"scheme {spec!r} gives {', '.join('-' + o for o in repeated)} more than once")
    group = re.search(r"g(\d+)", suffix)
    if group and wbits == 16:
        raise QrealignError(f"scheme {spec!r}: a group size applies to quantized weights, and W16 keeps them FP")
    if group and int(group[1]) < 1:
        raise QrealignError(f"scheme {spec!r}: the group size must be >= 1 (leave -g out for per-channel)")
    sym = "-sym" in suffix.replace("-asym-act", "")
    # options that would change nothing are refused, not ignored
    if "-wsym" in suffix and (wbits == 16 or sym):
        raise QrealignError(f"scheme {spec!r}: -wsym makes the weights symmetric; "
                            + ("W16 keeps them FP" if wbits == 16 else "-sym already does"))
    if "-asym-act" in suffix and (abits == 16 or not sym):
        raise QrealignError(f"scheme {spec!r}: -asym-act keeps the activations asymmetric under -sym; "
                            + ("A16 keeps them FP" if abits == 16 else "without -sym they are asymmetric already"))
    group_size = int(group[1]) if group else None
    if group_size is None and abits == 16 and wbits <= 4:  # as the W4A16 presets: weight-only 4-bit is grouped
        group_size = _WEIGHT_ONLY_GROUP
    weights = _w(wbits, group_size, sym=sym or "-wsym" in suffix) if wbits < 16 else None
    acts = _a(abits, sym=sym and "-asym-act" not in suffix) if abits < 16 else None
    return Scheme(f"W{wbits}A{abits}{suffix}", weights, acts)


def with_name(scheme: Scheme, name: str) -> Scheme:
    return replace(scheme, name=name)
