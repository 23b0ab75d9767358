"""Train/test overlap: refuse to report a harmful score on prompts that trained the model.

The Q-realign release evaluates on AdvBench while 150 of its calibration prompts and ~400 of its
probe-training prompts are AdvBench behaviours too, so its HS partly measures memorisation. Here
every artefact records which prompts built it, and evaluation checks against the whole chain.

Format, written by every stage into its `qrealign.json`:

    "provenance": {"<stage>": {"split": "calib", "n": 120, "ids": [...], "text_hashes": [...]}}
    "parent": "<directory this artefact was derived from>"      (optional; str or list of str)

A text hash is the first 16 hex digits of sha256(normalize_prompt(text)), so the same request
with different spacing or case still matches, and no prompt text needs to be stored.

Usage in a stage:  `meta.setdefault("provenance", {}).update(provenance_entry("calib", prompts, "calib"))`
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import QrealignError

META_FILE = "qrealign.json"


def text_hash(text: str) -> str:
    from ..data.prompts import normalize_prompt

    return hashlib.sha256(normalize_prompt(text).encode("utf-8")).hexdigest()[:16]


def _text_and_id(prompt: Any, index: int) -> tuple[str, str]:
    """Prompts may be `Prompt` records or plain strings (then the id is the text hash)."""
    if isinstance(prompt, str):
        return prompt, text_hash(prompt)
    text = getattr(prompt, "text", None)
    if not isinstance(text, str):
        raise QrealignError(f"prompt #{index} has no text: {prompt!r}")
    return text, str(getattr(prompt, "id", None) or text_hash(text))


def provenance_entry(stage: str, prompts: Sequence[Any], split: str | None) -> dict:
    """`{stage: {"split", "n", "ids", "text_hashes"}}` for the prompts a stage consumed; merge it
    into the artefact's metadata under "provenance"."""
    if not stage:
        raise QrealignError("provenance_entry needs a stage name")
    pairs = [_text_and_id(p, i) for i, p in enumerate(prompts)]
    return {stage: {"split": split, "n": len(pairs), "ids": [i for _, i in pairs],
                    "text_hashes": [text_hash(t) for t, _ in pairs]}}


# ---- reading the chain -----------------------------------------------------------------------

def _read_meta(path: Path) -> dict | None:
    from ..utils import read_json

    file = path if path.is_file() else path / META_FILE
    if not file.is_file():
        return None
    try:
        meta = read_json(file)
    except (OSError, ValueError) as exc:
        raise QrealignError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise QrealignError(f"{file} does not hold a JSON object")
    return meta


def _stages(meta: Mapping) -> dict[str, dict]:
    prov = meta.get("provenance") or {}
    if not isinstance(prov, Mapping):
        raise QrealignError(f"'provenance' must be an object, got {type(prov).__name__}")
    if "text_hashes" in prov:  # a single flat entry: {"stage": ..., "text_hashes": [...]}
        return {str(prov.get("stage", "unknown")): dict(prov)}
    return {str(k): dict(v) for k, v in prov.items() if isinstance(v, Mapping)}


def _parents(meta: Mapping) -> list[str]:
    """"parent" (str or list), plus "source" / "adapter" when they are strings: a quantization
    run names the model it was built on there, and that model's own provenance counts too. So do
    the models a Q-realign run learned from: the probes' models ("probe_parents") and the
    first-token teacher ("teacher": {"source": ...})."""
    out: list[str] = []
    teacher = meta.get("teacher")
    sources = {"parent": meta.get("parent"), "source": meta.get("source"), "adapter": meta.get("adapter"),
               "probe_parents": meta.get("probe_parents"),
               "teacher": teacher.get("source") if isinstance(teacher, Mapping) else None}
    for key, value in sources.items():
        values = value if isinstance(value, (list, tuple)) and key in ("parent", "probe_parents") else [value]
        out.extend(str(v) for v in values if isinstance(v, str) and v)
    return out


def collect_provenance(path_or_metadata: str | Path | Mapping) -> dict[str, dict]:
    """Every stage's provenance along the `parent` chain: {stage: entry}.

    Each entry gains "source" (the artefact it came from). When two artefacts in the chain have
    the same stage name, the farther one is keyed "<stage>@<source>". A parent that names a hub id
    or the embedded model ends the chain (base models carry no provenance); a parent that looks
    like a path but is gone is reported as "unresolved:<path>" with a warning, because the check
    is then incomplete."""
    out: dict[str, dict] = {}
    seen: set[str] = set()
    pending: list[tuple[Mapping | None, Path | None, str]] = []
    if isinstance(path_or_metadata, Mapping):
        pending.append((path_or_metadata, None, "<metadata>"))
    else:
        path = Path(path_or_metadata).expanduser()
        meta = _read_meta(path)
        if meta is None:
            return {}
        base = path if path.is_dir() else path.parent
        seen.add(str(base.resolve()))
        pending.append((meta, base, str(path)))
    while pending:
        meta, base, source = pending.pop(0)
        for stage, entry in _stages(meta).items():
            key = stage if stage not in out else f"{stage}@{source}"
            out[key] = {**entry, "source": source}
        for parent in _parents(meta):
            _queue_parent(parent, base, out, seen, pending)
    return out


def _queue_parent(parent: str, base: Path | None, out: dict, seen: set, pending: list) -> None:
    from ..models.load import looks_like_path

    candidate = Path(parent).expanduser()
    if not candidate.is_absolute() and base is not None and (base / candidate).exists():
        candidate = base / candidate
    if not candidate.exists() and base is not None and (base.parent / candidate.name).exists():
        # an output folder that moved as a whole (the demo's stages): the parent is a sibling, as
        # `calibrate.artifact.run_source` finds it
        candidate = base.parent / candidate.name
    if candidate.exists():
        resolved = str((candidate if candidate.is_dir() else candidate.parent).resolve())
        if resolved in seen:
            return
        seen.add(resolved)
        meta = _read_meta(candidate)
        if meta is not None:
            pending.append((meta, candidate if candidate.is_dir() else candidate.parent, str(candidate)))
        return
    if looks_like_path(parent):
        warnings.warn(f"provenance parent {parent} does not exist: the overlap check cannot see what it used",
                      stacklevel=3)
        out[f"unresolved:{parent}"] = {"split": None, "n": 0, "ids": [], "text_hashes": [], "source": parent,
                                       "unresolved": True}


# ---- the check -------------------------------------------------------------------------------

@dataclass
class OverlapResult:
    n_eval: int
    by_stage: dict[str, dict] = field(default_factory=dict)  # {stage: {"count", "split", "eval_ids"}}
    forced: bool = False
    unresolved: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Distinct evaluation prompts seen by at least one stage."""
        return len({i for s in self.by_stage.values() for i in s["eval_ids"]})

    @property
    def clean(self) -> bool:
        """No evaluation prompt was found in a stage's prompts (see `complete` for what was read)."""
        return not self.by_stage

    @property
    def complete(self) -> bool:
        """Every stage of the chain was read (an unresolved parent's prompts could not be checked)."""
        return not self.unresolved

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "clean": self.clean, "complete": self.complete}


def check_overlap(eval_prompts: Sequence[Any], provenance: Mapping[str, Mapping], force: bool = False,
                  what: str = "evaluation") -> OverlapResult:
    """Raise if any evaluation prompt was used by a stage in `provenance` (from
    `collect_provenance`); with `force`, warn instead and return the overlap so it is recorded in
    the result next to the numbers it contaminates."""
    pairs = [_text_and_id(p, i) for i, p in enumerate(eval_prompts)]
    hashes = [text_hash(t) for t, _ in pairs]
    result = OverlapResult(n_eval=len(pairs), forced=force)
    for stage, entry in provenance.items():
        if entry.get("unresolved"):
            result.unresolved.append(str(entry.get("source", stage)))
            continue
        used = set(entry.get("text_hashes") or [])
        hits = [pairs[i][1] for i, h in enumerate(hashes) if h in used]
        if hits:
            result.by_stage[stage] = {"count": len(hits), "split": entry.get("split"), "eval_ids": hits}
    if result.by_stage:
        detail = "; ".join(f"{v['count']} of {result.n_eval} used by stage '{k}' (split {v['split']})"
                           for k, v in result.by_stage.items())
        if not force:
            raise QrealignError(f"{what} prompts overlap the model's training/calibration prompts: {detail}. "
                                f"Use disjoint prompts, or pass --force-overlap to evaluate anyway (recorded).")
        warnings.warn(f"{what} prompts overlap: {detail} (forced; recorded in the result)", stacklevel=2)
    return result
