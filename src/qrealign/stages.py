"""A tiny content-addressed cache for pipeline stages (align, attack, realign, evaluate...).

A stage's output directory is `root/<name>-<sha256 of its inputs>`. The inputs are everything
that decides the output: the parent model's fingerprint, the stage config, the data fingerprint
and the qrealign version. A second run with the same inputs finds the directory and skips the
work; a changed input gives a new directory. Completeness comes from `atomic_dir`: a directory
exists under its final name only if its build finished.

Code is not an input: the package version does not move with every commit, and hashing the
source would throw away hours of cached stages for every comment. So a change that alters what a
stage builds must bump that stage kind's entry in `STAGE_REVISIONS` (the part of the name before
the first "-": align, attack, probes, targets, quant, eval); at 0 it is left out of the key, so
bumping one kind leaves every other cached stage valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import QrealignError
from .utils import atomic_dir, sha256_json


#: Behaviour revisions per stage kind; bump one when a code change alters that kind's output.
STAGE_REVISIONS: dict[str, int] = {}


def stage_dir(name: str, fingerprint_inputs: dict[str, Any], root: str | Path) -> Path:
    """Where the stage with these inputs lives (whether or not it was built)."""
    if not name or "/" in name or name.startswith("."):
        raise QrealignError(f"bad stage name {name!r}")
    revision = STAGE_REVISIONS.get(name.split("-", 1)[0], 0)
    if revision:
        fingerprint_inputs = {**fingerprint_inputs, "stage_revision": revision}
    return Path(root) / f"{name}-{sha256_json(fingerprint_inputs)}"


def cached_stage(name: str, fingerprint_inputs: dict[str, Any], root: str | Path,
                 build: Callable[[Path], None], *, force: bool = False, log: Callable[[str], None] | None = print
                 ) -> Path:
    """Return the stage's output directory, calling `build(tmp_dir)` only if it is not there yet.

    `build` writes into a temporary directory that is renamed into place when it returns, so an
    interrupted build leaves nothing that a later run would take for finished. `force=True`
    rebuilds even when the directory exists."""
    final = stage_dir(name, fingerprint_inputs, root)
    if final.is_dir() and not force:
        if log:
            log(f"[{name}] cached: {final}")
        return final
    if log:
        log(f"[{name}] building: {final}")
    with atomic_dir(final) as tmp:
        build(tmp)
    return final
