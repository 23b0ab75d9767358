"""The bundled prompt set and loaders for user prompt files.

The bundled set (``data/prompts/harmful.jsonl`` and ``benign.jsonl``) was written for this project;
see ``data/README.md`` for how, the categories and the split policy. Splits are fixed in the files,
never recomputed at load time, so every run of every stage sees the same prompts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .types import Prompt

__all__ = [
    "SPLITS",
    "HARM_CATEGORIES",
    "BENIGN_CATEGORIES",
    "SUPPLEMENTS",
    "HELD_OUT_SETS",
    "load_prompts",
    "load_supplement",
    "load_held_out",
    "held_out_texts",
    "held_out_matches",
    "limited_classes",
    "load_twin_pairs",
    "load_prompt_file",
    "prompt_set_fingerprint",
    "normalize_prompt",
]

#: Fixed, disjoint splits of the bundled set, in the order the pipeline uses them.
#: align: refusal SFT of the reference model; attack: harmful fine-tuning poison (harmful only);
#: probe: probe fitting; calib: quantization calibration; eval: held-out evaluation only.
SPLITS: tuple[str, ...] = ("align", "attack", "probe", "calib", "eval")

#: Calibration-only prompt sets outside the splits: "twins" holds a benign twin for each `calib`
#: and `attack` harmful prompt that had none (docs/experiments.md §14); "edgy" holds 48
#: edgy-but-harmless requests ("kill all the background jobs in my terminal"), kept apart from
#: every eval, confirm and probe prompt by word overlap (§61). They are train-side data (no twin
#: of a probe or eval prompt) and enter nothing unless named, e.g. "qrealign:twins".
SUPPLEMENTS: dict[str, str] = {"twins": "twins_extra.jsonl", "edgy": "edgy_extra.jsonl"}

#: Evaluation-only prompt sets outside the splits, never read by any stage or choice before their
#: first read: "confirm" was written after the `eval` split had been read many times for the demo's
#: choices (docs/experiments.md §30), so it gives an unbiased second read. Like `eval`, they never
#: enter calibration and are evaluated as qrealign:<name>:<harmful|benign|all>.
HELD_OUT_SETS: dict[str, str] = {"confirm": "confirm.jsonl"}

HARM_CATEGORIES: tuple[str, ...] = (
    "weapons",
    "cybercrime",
    "fraud",
    "drugs",
    "hate-harassment",
    "self-harm",
    "privacy-stalking",
    "violence",
    "theft",
    "misinformation",
    "extremism",
)
BENIGN_CATEGORIES: tuple[str, ...] = ("benign", "benign-edgy")

_FILES = ("harmful.jsonl", "benign.jsonl")
_FIELDS = ("id", "text", "label", "category", "split", "twin")
_TEXT_KEYS = ("prompt", "text")
_LABEL_WORDS = {
    "1": 1, "harmful": 1, "malicious": 1, "unsafe": 1, "true": 1,
    "0": 0, "benign": 0, "safe": 0, "harmless": 0, "false": 0,
}
CUSTOM_SPLIT = "custom"


# --------------------------------------------------------------------------- bundled set


@lru_cache(maxsize=None)
def _read_bundled(name: str) -> tuple[Prompt, ...]:
    text = resources.files("qrealign.data").joinpath("prompts", name).read_text(encoding="utf-8")
    out: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:  # pragma: no cover - guards against a broken install
            raise ValueError(f"bundled {name}: invalid JSON on line {lineno}: {exc.msg}") from exc
        out.append(Prompt(**{k: row.get(k) for k in _FIELDS}))
    return tuple(out)


@lru_cache(maxsize=1)
def _bundled() -> tuple[Prompt, ...]:
    return tuple(p for name in _FILES for p in _read_bundled(name))


def load_supplement(name: str) -> list[Prompt]:
    """A bundled calibration-only prompt set (see :data:`SUPPLEMENTS`), in file order."""
    if name not in SUPPLEMENTS:
        raise ValueError(f"unknown prompt supplement {name!r}; expected one of {', '.join(SUPPLEMENTS)}")
    return list(_read_bundled(SUPPLEMENTS[name]))


def load_prompts(
    split: str | None = None,
    label: int | None = None,
    category: str | Iterable[str] | None = None,
) -> list[Prompt]:
    """Return bundled prompts, optionally filtered.

    Args:
        split: one of :data:`SPLITS`, or ``None`` for all splits.
        label: 1 (harmful), 0 (benign) or ``None`` for both.
        category: a category name or an iterable of names (e.g. ``"benign-edgy"``,
            ``HARM_CATEGORIES``), or ``None`` for all.

    The order is stable (harmful first, by category, then benign), so ``load_prompts(...)[:n]``
    is deterministic; shuffle with a seeded RNG if you need a random subset.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if label is not None and label not in (0, 1):
        raise ValueError(f"label must be 0 (benign), 1 (harmful) or None, got {label!r}")
    cats: set[str] | None = None
    if category is not None:
        cats = {category} if isinstance(category, str) else set(category)
        known = set(HARM_CATEGORIES) | set(BENIGN_CATEGORIES)
        unknown = cats - known
        if unknown:
            raise ValueError(
                f"unknown category {sorted(unknown)}; expected some of {', '.join(sorted(known))}"
            )
    return [
        p
        for p in _bundled()
        if (split is None or p.split == split)
        and (label is None or p.label == label)
        and (cats is None or p.category in cats)
    ]


def load_twin_pairs(split: str | None = None) -> list[tuple[Prompt, Prompt]]:
    """Return (harmful, benign twin) pairs of the bundled set, optionally for one split."""
    by_id = {p.id: p for p in _bundled()}
    return [
        (p, by_id[p.twin])
        for p in load_prompts(split=split, label=1)
        if p.twin is not None
    ]


def load_held_out(name: str, label: int | None = None) -> list[Prompt]:
    """A bundled evaluation-only prompt set (see :data:`HELD_OUT_SETS`), in file order."""
    if name not in HELD_OUT_SETS:
        raise ValueError(f"unknown held-out prompt set {name!r}; expected one of {', '.join(HELD_OUT_SETS)}")
    if label is not None and label not in (0, 1):
        raise ValueError(f"label must be 0 (benign), 1 (harmful) or None, got {label!r}")
    return [p for p in _read_bundled(HELD_OUT_SETS[name]) if label is None or p.label == label]


def held_out_texts() -> dict[str, str]:
    """Normalized text -> the held-out set it belongs to (the `eval` split and every
    :data:`HELD_OUT_SETS` entry): what calibration must never see."""
    out = {normalize_prompt(p.text): "eval" for p in load_prompts(split="eval")}
    for name in HELD_OUT_SETS:
        out.update({normalize_prompt(p.text): name for p in load_held_out(name)})
    return out


def held_out_matches(prompts) -> list[tuple[str, str]]:
    """(text, held-out set name) for each of `prompts` (records or strings) whose text is in a
    bundled held-out set (`held_out_texts`): what calibration refuses and probe fitting warns of."""
    held_out = held_out_texts()
    texts = (getattr(p, "text", p) for p in prompts)
    return [(t, held_out[normalize_prompt(t)]) for t in texts if normalize_prompt(t) in held_out]


def limited_classes(harmful: list, benign: list, limit: int, seed: int = 0) -> tuple[list, list]:
    """At most `limit` prompts per class, in file order. The bundled files are ordered by harm
    category, so the first N would fit a quick probe on one or two categories: the harmful side is
    a seeded sample across the file, and the benign side takes the kept prompts' twins first (the
    matched-accuracy metric needs them), then a seeded sample of the rest."""
    rng = random.Random(seed)

    def sample(items: list, n: int) -> list:
        keep = set(rng.sample(range(len(items)), n)) if n < len(items) else set(range(len(items)))
        return [p for i, p in enumerate(items) if i in keep]

    harmful = sample(harmful, limit)
    twins = {getattr(p, "twin", None) for p in harmful} - {None}
    first = [p for p in benign if getattr(p, "id", None) in twins][:limit]
    rest = sample([p for p in benign if getattr(p, "id", None) not in twins], limit - len(first))
    chosen = {id(p) for p in first + rest}
    return harmful, [p for p in benign if id(p) in chosen]


# --------------------------------------------------------------------------- user files


def load_prompt_file(
    path: str | Path,
    default_label: int | None = None,
    default_category: str | None = None,
) -> list[Prompt]:
    """Load prompts from a user file.

    Formats (chosen by extension, or sniffed from the first character when unknown):

    * ``.json``: a list of objects (or of plain strings), or an object holding such a list under
      ``"prompts"`` or ``"data"``;
    * ``.jsonl``: one object (or string) per line; blank lines are ignored;
    * ``.csv`` / ``.tsv``: a header row with a ``prompt`` (or ``text``) column.

    Each record needs the prompt text under ``prompt`` or ``text``. Optional fields: ``label``
    (0/1, or ``harmful``/``benign``/``malicious``/``safe``), ``category``, ``id``, ``twin``. A
    record without a label takes ``default_label``; if that is ``None`` a :class:`ValueError`
    is raised. Missing ids become ``"<file stem>-<index>"``; the split is always ``"custom"``.
    """
    path = Path(path)
    if default_label is not None:
        default_label = _parse_label(default_label, where="default_label")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {not_utf8(path, exc)}") from None
    if not raw.strip():
        raise ValueError(f"{path}: the prompt file is empty")

    fmt = _detect_format(path, raw)
    if fmt == "json":
        records = _read_json(path, raw)
    elif fmt == "jsonl":
        records = _read_jsonl(path, raw)
    else:
        records = _read_csv(path, raw, delimiter="\t" if fmt == "tsv" else ",")
    if not records:
        raise ValueError(f"{path}: no prompts found")

    prompts: list[Prompt] = []
    seen_ids: set[str] = set()
    seen_text: dict[str, tuple[str, int]] = {}  # normalized text -> (where, label)
    repeats = []
    for where, rec in records:
        text = _get_text(path, where, rec)
        raw_label = rec.get("label")
        if raw_label is None or (isinstance(raw_label, str) and not raw_label.strip()):
            if default_label is None:
                raise ValueError(
                    f"{path}: {where} has no 'label' (0 = benign, 1 = harmful); add a label column/field "
                    f"(fields found: {', '.join(sorted(rec)) or 'none'}; in Python, default_label= labels them all)"
                )
            label = default_label
        else:
            label = _parse_label(raw_label, where=f"{path}: {where}")
        key = normalize_prompt(text)
        if key in seen_text:
            first, first_label = seen_text[key]
            if first_label != label:
                raise ValueError(f"{path}: {where} repeats the prompt of {first} with another label "
                                 f"({label} vs {first_label}): one prompt cannot be both harmful and benign")
            repeats.append(where)
            continue  # the same prompt twice would count twice in a rate and weigh double in calibration
        seen_text[key] = (where, label)
        category = rec.get("category")
        category = str(category).strip() if category not in (None, "") else None
        if category is None:
            category = default_category or ("harmful" if label == 1 else "benign")
        pid = rec.get("id")
        pid = str(pid).strip() if pid not in (None, "") else f"{path.stem}-{len(prompts):04d}"
        if pid in seen_ids:
            raise ValueError(f"{path}: {where} repeats id {pid!r}")
        seen_ids.add(pid)
        twin = rec.get("twin")
        twin = str(twin).strip() if twin not in (None, "") else None
        prompts.append(Prompt(id=pid, text=text, label=label, category=category,
                              split=CUSTOM_SPLIT, twin=twin))
    if repeats:
        import warnings

        shown = ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else "")
        warnings.warn(f"{path}: {len(repeats)} repeated prompt(s) skipped ({shown})", stacklevel=2)
    return prompts


def not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    """Why a text file did not decode, and the fix (shared by prompt and task files)."""
    head = path.read_bytes()[:2]
    kind = "UTF-16 text" if head in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text"
    return f"{kind} ({exc.reason} at byte {exc.start}); save it as UTF-8"


def _detect_format(path: Path, raw: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".ndjson":
        return "jsonl"
    if suffix == ".json":
        # A ".json" file that is really JSON Lines is common enough to accept.
        stripped = raw.lstrip()
        if stripped.startswith("{") and len([ln for ln in raw.splitlines() if ln.strip()]) > 1:
            try:
                json.loads(raw)
            except json.JSONDecodeError:
                return "jsonl"
        return "json"
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    first = raw.lstrip()[:1]
    if first == "[":
        return "json"
    if first == "{":
        try:
            json.loads(raw)
            return "json"
        except json.JSONDecodeError:
            return "jsonl"
    return "csv"


def _read_json(path: Path, raw: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict):
        for key in ("prompts", "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise ValueError(
                f"{path}: expected a JSON list of prompts (or an object with a 'prompts' list), "
                f"got an object with keys {sorted(data)[:8]}"
            )
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    return [(f"item {i}", _as_record(path, f"item {i}", item)) for i, item in enumerate(data)]


def _read_jsonl(path: Path, raw: str) -> list[tuple[str, dict]]:
    out = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON on line {lineno}: {exc.msg}") from None
        out.append((f"line {lineno}", _as_record(path, f"line {lineno}", item)))
    return out


def _read_csv(path: Path, raw: str, delimiter: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(raw), delimiter=delimiter)
    if reader.fieldnames is None:
        raise ValueError(f"{path}: the prompt file is empty")
    fields = [(f or "").strip().lower() for f in reader.fieldnames]
    if not any(k in fields for k in _TEXT_KEYS):
        raise ValueError(
            f"{path}: CSV needs a 'prompt' (or 'text') column; found columns {fields}"
        )
    out = []
    for i, row in enumerate(reader):
        if row.get(None):  # more fields than the header: an unquoted delimiter inside a prompt
            raise ValueError(f"{path}: row {i + 2} has {len(fields) + len(row[None])} fields, the header "
                             f"{len(fields)}; quote fields that contain {'tabs' if delimiter == chr(9) else 'commas'}")
        rec = {(k or "").strip().lower(): (v.strip() if isinstance(v, str) else v)
               for k, v in row.items() if k is not None}
        if not any(v for v in rec.values()):
            continue  # blank row
        out.append((f"row {i + 2}", rec))  # row 1 is the header
    return out


def _as_record(path: Path, where: str, item: object) -> dict:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, dict):
        return {str(k).lower(): v for k, v in item.items()}
    raise ValueError(f"{path}: {where} must be an object or a string, got {type(item).__name__}")


def _get_text(path: Path, where: str, rec: dict) -> str:
    for key in _TEXT_KEYS:
        value = rec.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{path}: {where} field {key!r} must be a string")
            if not value.strip():
                raise ValueError(f"{path}: {where} has an empty {key!r}")
            return value.strip()
    raise ValueError(f"{path}: {where} has no 'prompt' (or 'text') field; found {sorted(rec)}")


def _parse_label(value: object, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
        return _LABEL_WORDS[value.strip().lower()]
    if isinstance(value, str) and value.strip() in ("0.0", "1.0"):  # a pandas export of a float column
        return int(float(value))
    raise ValueError(f"{where}: invalid label {value!r}; use 0 (benign) or 1 (harmful)")


# --------------------------------------------------------------------------- utilities


def prompt_set_fingerprint(prompts: Iterable[Prompt]) -> str:
    """Short sha256 hex (16 chars) over the ids and texts of a prompt set.

    Order-independent (records are sorted by id, then text), so the same set loaded in another
    order has the same fingerprint; labels/splits are not included.
    """
    h = hashlib.sha256()
    for pid, text in sorted((p.id, p.text) for p in prompts):
        h.update(pid.encode("utf-8"))
        h.update(b"\x1f")
        h.update(text.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()[:16]


_WS = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """Normalise a prompt for overlap checks: NFKC, lowercase, punctuation removed, whitespace collapsed.

    Apostrophes are dropped without a space (``"don't"`` -> ``"dont"``); other punctuation and
    symbols become spaces, so ``"step-by-step"`` -> ``"step by step"``.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for ch in text:
        if ch in "'\u2019\u2018`":
            continue
        cat = unicodedata.category(ch)
        chars.append(" " if cat[0] in ("P", "S") else ch)
    return _WS.sub(" ", "".join(chars)).strip()
