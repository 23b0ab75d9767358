"""`--layers` as every command reads it: indices and inclusive ranges, e.g. '3,5,7' or '10-29'."""
from __future__ import annotations

from ..errors import QrealignError


def parse_layers(spec: str | None) -> list[int] | None:
    """None for no selection (the command's default); otherwise the layer indices, in order."""
    if not spec or not spec.strip():
        return None
    layers: list[int] = []
    try:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise QrealignError(f"--layers {spec!r}: use layer indices and ranges, e.g. '10-29' or '3,5,7'") from None
    if not layers:
        raise QrealignError(f"--layers {spec!r} names no layer: use layer indices and ranges, e.g. '10-29' or '3,5,7'")
    return layers
