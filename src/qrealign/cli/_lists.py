"""Comma-separated options as every command reads them (`--schemes`, `--names`, `--adapters`, ...)."""
from __future__ import annotations

from ..errors import QrealignError


def split_list(spec: str | None, keep_empty: bool = False) -> list[str]:
    """The entries of a comma-separated option, stripped. Empty entries are dropped, or kept as ""
    with `keep_empty` (lists that pair up with positional arguments, e.g. one adapter per model)."""
    if not spec:
        return []
    entries = [part.strip() for part in spec.split(",")]
    return entries if keep_empty else [e for e in entries if e]


def one_per(spec: str | None, items: list, flag: str, default: list[str]) -> list[str]:
    """`flag`'s entries, one per item (or `default` when the option is not given); each a distinct,
    non-empty name (rows and plot files are named after them)."""
    names = split_list(spec, keep_empty=True) if spec else list(default)
    if len(names) != len(items):
        raise QrealignError(f"{flag} has {len(names)} names for {len(items)} entries")
    if "" in names or len(set(names)) != len(names):
        raise QrealignError(f"{flag}: the names must be non-empty and distinct, got {names}")
    return names


def floats(spec: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(e) for e in split_list(spec))
    except ValueError:
        raise QrealignError(f"{flag} wants comma-separated numbers, got {spec!r}") from None
