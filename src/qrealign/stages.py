"""A tiny content-addressed cache for pipeline stages (align, attack, realign, evaluate...).

A stage's output directory is `root/<name>-<sha256 of its inputs>`. The inputs are everything
that decides the output: the parent model's fingerprint, the stage config, the data fingerprint
and the qrealign version. A second run with the same inputs finds the directory and skips the
work; a changed input gives a new directory. Completeness comes from `atomic_dir`: a directory
exists under its final name only if its build finished.

Code is not an input: the package version does not move with every commit, and hashing the
source would throw away hours of cached stages for every comment. So a change that alters what a
stage builds must bump that stage kind's entry in `STAGE_REVISIONS` (the part of the name before
the first "-": align, attack, probes, targets, quant, export, eval); at 0 it is left out of the key, so
bumping one kind leaves every other cached stage valid.

A missed bump is caught on reuse: each stage records a digest of the code that decides its
output (`stage_code`, in `qrealign-stage.json`), and a cached stage whose code changed since is
named with the changed modules (or rebuilt, with `rebuild_changed=True`). The record does not
decide the key, so a refactor that keeps the numbers costs a warning, not hours of rebuilds.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import QrealignError
from .stage_code import changed_modules, code_digest, stage_kind
from .utils import atomic_dir, read_json, sha256_json, write_json


#: Behaviour revisions per stage kind; bump one when a code change alters that kind's output.
STAGE_REVISIONS: dict[str, int] = {}
#: Written into every stage built by `cached_stage`: the code digest and versions that built it.
PROVENANCE_FILE = "qrealign-stage.json"


def stage_dir(name: str, fingerprint_inputs: dict[str, Any], root: str | Path) -> Path:
    """Where the stage with these inputs lives (whether or not it was built)."""
    if not name or "/" in name or name.startswith("."):
        raise QrealignError(f"bad stage name {name!r}")
    revision = STAGE_REVISIONS.get(stage_kind(name), 0)
    if revision:
        fingerprint_inputs = {**fingerprint_inputs, "stage_revision": revision}
    return Path(root) / f"{name}-{sha256_json(fingerprint_inputs)}"


def cached_stage(name: str, fingerprint_inputs: dict[str, Any], root: str | Path,
                 build: Callable[[Path], None], *, force: bool = False, rebuild_changed: bool = False,
                 upstream: Iterable[str | Path | None] = (), log: Callable[[str], None] | None = print) -> Path:
    """Return the stage's output directory, calling `build(tmp_dir)` only if it is not there yet.

    `build` writes into a temporary directory that is renamed into place when it returns, so an
    interrupted build leaves nothing that a later run would take for finished. `force=True`
    rebuilds even when the directory exists; `rebuild_changed=True` rebuilds a cached stage that
    is not known to be built by today's code (`stage_code_change`). `upstream`: the stages this
    one reads (others, e.g. a model outside the stages folder, are skipped); a stage whose
    upstream was rebuilt after it, or is itself not known to match, is not known to match either."""
    final = stage_dir(name, fingerprint_inputs, root)
    if final.is_dir() and not force:
        change = stage_code_change(final)
        if not (change and rebuild_changed):
            if log:
                log(f"[{name}] cached: {final}" + (f" ({change})" if change else ""))
            return final
        if log:
            log(f"[{name}] rebuilding ({change})")
    elif log:
        log(f"[{name}] building: {final}")
    before = code_digest(stage_kind(name))
    with atomic_dir(final) as tmp:
        build(tmp)
        record = provenance(name, final.parent, upstream)
        if record["code"] != before["digest"]:  # edited while it built: which code built it is unknown
            record["code"] = None
        write_json(tmp / PROVENANCE_FILE, record)
    return final


def provenance(name: str, root: str | Path | None = None, upstream: Iterable[str | Path | None] = ()) -> dict:
    """What builds a stage now: its kind's code digest (per module too), revision, versions, a
    build id (new at every build) and the build ids of its upstream stages in `root`."""
    import uuid
    from datetime import datetime, timezone

    from . import __version__

    kind = stage_kind(name)
    code = code_digest(kind)
    ups = {}
    for p in upstream:
        if p is not None and root is not None and Path(p).parent.resolve() == Path(root).resolve():
            ups[Path(p).name] = (_read_record(Path(p)) or {}).get("build")
    return {"stage": name, "kind": kind, "revision": STAGE_REVISIONS.get(kind, 0), "code": code["digest"],
            "modules": code["files"], "build": uuid.uuid4().hex, "upstream": ups, "qrealign": __version__,
            **_library_versions(), "python": platform.python_version(),
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def stage_code_change(path: str | Path, _seen: frozenset = frozenset()) -> str | None:
    """None if the stage at `path` and every stage upstream of it were built by today's code under
    today's torch and transformers, and none of those was rebuilt after it; otherwise why not."""
    path = Path(path)
    if not (path / PROVENANCE_FILE).is_file():
        return "built before stages recorded their code: not known to match today's"
    record = _read_record(path)
    if record is None:
        return f"its {PROVENANCE_FILE} cannot be read: not known to match today's"
    if record.get("code") is None:
        return "its code was edited while it was built: not known to match today's"
    current = code_digest(record.get("kind") or stage_kind(path.name))
    if record["code"] != current["digest"]:
        modules = changed_modules({"files": record.get("modules", {})}, current)
        shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
        why = f"built by other code: {shown or 'the module set'} changed since {record.get('built_utc', '?')}"
        if record.get("python") not in (None, platform.python_version()):  # ast.unparse may differ
            why += f" (or only Python: it was {record['python']}, now {platform.python_version()})"
        return why
    libraries = _library_versions()
    moved = [f"{lib} {record[lib]} -> {now}" for lib, now in libraries.items() if record.get(lib, now) != now]
    if moved:  # other kernels can give other float rounding
        return f"built under other libraries: {', '.join(moved)}"
    for name, build in (record.get("upstream") or {}).items():
        up = path.parent / name
        if not up.is_dir() or name in _seen:
            continue
        if stage_code_change(up, _seen | {path.name}):
            return f"its upstream stage {name} is not known to match today's code"
        if (_read_record(up) or {}).get("build") != build:
            return f"its upstream stage {name} was rebuilt after it"
    return None


def _library_versions() -> dict:
    """The libraries whose kernels decide a stage's float rounding."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _read_record(path: Path) -> dict | None:
    try:
        record = read_json(path / PROVENANCE_FILE)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def stage_code_changes(paths) -> dict[str, str | None]:
    """`stage_code_change` of each stage in `paths`, by stage name (a stage named twice counts once)."""
    return {Path(p).name: stage_code_change(p) for p in paths}


def stage_code_lines(changes: dict[str, str | None]) -> list[str]:
    """Markdown lines for a report from `stage_code_changes`: whether each stage was built by
    today's code of its kind."""
    stale = {name: why for name, why in changes.items() if why}
    if not stale:
        return [f"- All {len(changes)} stages were built by this code (the modules that decide their numbers)."]
    return [f"- **{len(stale)} of {len(changes)} stages are not known to be built by this code**: a rebuild could "
            "give other numbers (`qrealign demo --rebuild-changed` rebuilds them).",
            *(f"  - `{name}`: {why}" for name, why in stale.items())]
