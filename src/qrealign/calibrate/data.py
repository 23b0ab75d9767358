"""Calibration prompts and how they are batched.

Prompts are tokenized once with the shared chat rendering, sorted by length and cut into
batches (length bucketing: little padding, any batch size), with labels (1 = malicious,
0 = benign) carried alongside for class-conditional losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..errors import QrealignError
from ..models.chat import EncodedPrompts, encode_prompts, with_response
from ..utils import position_ids_from_mask


@dataclass
class CalibrationSet:
    prompts: list[str]
    labels: list[int]
    ids: list[str] = field(default_factory=list)
    split: str = "custom"

    def __post_init__(self):
        if not self.prompts:
            raise QrealignError("calibration set is empty")
        if len(self.labels) != len(self.prompts):
            raise QrealignError("calibration prompts and labels differ in length")
        bad = [label for label in self.labels if isinstance(label, float) or label not in (0, 1)]
        if bad:  # the losses read labels.bool(), other code labels == 0: anything else means two things
            raise QrealignError(f"calibration labels must be 0 (benign) or 1 (malicious), got {bad[:3]}")
        if not self.ids:
            self.ids = [f"calib-{i}" for i in range(len(self.prompts))]
        elif len(self.ids) != len(self.prompts):  # records() would pair them up wrongly
            raise QrealignError(f"calibration ids and prompts differ in length ({len(self.ids)} vs {len(self.prompts)})")

    def __len__(self) -> int:
        return len(self.prompts)

    def records(self) -> list[SimpleNamespace]:
        """(id, text) records, the shape provenance and overlap checks read."""
        return [SimpleNamespace(id=i, text=t) for i, t in zip(self.ids, self.prompts)]

    @property
    def malicious_ratio(self) -> float:
        return sum(self.labels) / len(self.labels)

    def fingerprint(self) -> str:
        """Short sha256 over (id, text, label) in order: what a cached calibration depends on."""
        from ..utils import sha256_json

        return sha256_json([list(r) for r in zip(self.ids, self.prompts, self.labels)])


@dataclass
class CalibBatch:
    enc: EncodedPrompts
    labels: torch.Tensor  # [B]
    index: torch.Tensor  # [B] positions in the CalibrationSet

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token, so left and right padding give the
        same RoPE angles to the same tokens."""
        return position_ids_from_mask(self.enc.attention_mask)


def make_batches(tokenizer, calib: CalibrationSet, batch_size: int, max_length: int | None = None,
                 padding_side: str | None = None, system: str | None = None,
                 sort_by_length: bool = True, group_by_label: bool = False,
                 pad_to: int | None = None, responses: Sequence[Sequence[int]] | None = None) -> list[CalibBatch]:
    """Length-bucketed batches. `group_by_label` keeps malicious and benign prompts in separate
    batches, so the engine can skip the FP stream for batches whose loss never reads it.
    `responses`: per calibration position, response tokens appended after the rendered prompt
    (a multi-token first-token objective's forced response starts; `chat.with_response`); each
    batch's `enc.last_index` is then still the last prompt token."""
    if batch_size < 1:
        raise QrealignError("batch_size must be >= 1")
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in calib.prompts]
    everything = list(range(len(calib.prompts)))
    groups = [[i for i in everything if calib.labels[i] == y] for y in sorted(set(calib.labels))] \
        if group_by_label else [everything]
    batches = []
    for group in groups:
        order = sorted(group, key=lambda i: lengths[i]) if sort_by_length else group
        batches.extend(_cut(tokenizer, calib, order, batch_size, max_length, padding_side, system, pad_to,
                            responses))
    return batches


def _cut(tokenizer, calib, order, batch_size, max_length, padding_side, system, pad_to,
         responses=None) -> list[CalibBatch]:
    if responses is not None and len(responses) != len(calib.prompts):
        raise QrealignError(f"{len(responses)} forced responses for {len(calib.prompts)} calibration prompts")
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = encode_prompts(tokenizer, [calib.prompts[i] for i in idx], system=system,
                             max_length=max_length, padding_side=padding_side, pad_to=pad_to)
        if responses is not None:
            enc = with_response(enc, [responses[i] for i in idx], tokenizer.pad_token_id)
        batches.append(CalibBatch(enc, torch.tensor([calib.labels[i] for i in idx]), torch.tensor(idx)))
    return batches


# Task prompts `task` adds when `task_n` is not given (the CLI's --calib-task alike).
CALIB_TASK_N = 48


def build_calibration(spec: str = "qrealign:calib", n: int | None = None, malicious_ratio: float | None = 0.75,
                      seed: int = 0, task: str | None = None, task_n: int | None = None,
                      extra_benign: str | Sequence[str] | None = None,
                      extra_malicious: str | Sequence[str] | None = None) -> CalibrationSet:
    """A labelled calibration set with a given malicious ratio (paper: 200 prompts, 0.75).

    `spec` is "qrealign:<split>" (the project's bundled prompts; default the "calib" split, which
    is disjoint from the evaluation split by construction) or a user file (JSON/JSONL/CSV with
    `prompt` and `label`). `n=None` takes as many as the ratio allows; `malicious_ratio=None`
    keeps the file's own mix.

    `task`/`task_n`: append the first `task_n` prompts (default `CALIB_TASK_N`, 48; 0: none) of
    that task's "train" split (the user's own fine-tuning prompts) as benign samples, after the
    ratio is applied. The benign terms then hold the fine-tuned behaviour on the task itself, not
    only on generic prompts.

    `extra_benign`: more sources (same forms as `spec`, one or a sequence) whose benign prompts are
    all appended too, last, each prompt once: more benign variety is what holds over-refusal down
    (docs/experiments.md §6). Naming `spec` itself adds the benign prompts the ratio left out, e.g.
    the twins of calibration prompts.

    `extra_malicious`: the same for harmful prompts (label 1), e.g. the harmful halves of benign
    twins added above, so that each topic shows both sides of the line (docs/experiments.md §22)."""
    import os
    import random

    if n is not None and n < 1:
        raise QrealignError(f"calibration size n must be >= 1 (or None: the whole set), got {n}")
    if task_n and not task:
        raise QrealignError(f"task_n={task_n} adds a task's prompts: name the task (task=...)")
    spec = os.fspath(spec)  # a Path names a file as its string does, alone or in a sequence
    extra_benign, extra_malicious = ([os.fspath(s) for s in x] if isinstance(x, (list, tuple)) else
                                     os.fspath(x) if isinstance(x, os.PathLike) else x
                                     for x in (extra_benign, extra_malicious))
    prompts, split = _load_spec(spec)
    harmful = [p for p in prompts if p.label == 1]
    benign = [p for p in prompts if p.label == 0]
    rng = random.Random(seed)
    rng.shuffle(harmful)
    rng.shuffle(benign)
    if malicious_ratio is None:  # the source's own mix, also when n takes a part of it
        k = len(harmful) if n is None or n >= len(prompts) else round(n * len(harmful) / len(prompts))
        chosen = harmful[:k] + benign[: (len(benign) if n is None else n - k)]
    else:
        if not 0.0 <= malicious_ratio <= 1.0:
            raise QrealignError(f"malicious_ratio must be in [0, 1], got {malicious_ratio}")
        if n is None:
            limits = []
            if malicious_ratio > 0:
                limits.append(len(harmful) / malicious_ratio)
            if malicious_ratio < 1:
                limits.append(len(benign) / (1 - malicious_ratio))
            n = int(min(limits))
        for have, want, kind, label in ((harmful, malicious_ratio > 0, "malicious", 1),
                                        (benign, malicious_ratio < 1, "benign", 0)):
            if want and not have:
                raise QrealignError(f"calibration set {spec!r} has no {kind} (label {label}) prompts; malicious "
                                    f"ratio {malicious_ratio} needs some")
        n_mal = round(n * malicious_ratio)
        n_ben = n - n_mal
        if (malicious_ratio > 0 and n_mal == 0) or (malicious_ratio < 1 and n_ben == 0):
            raise QrealignError(f"calibration set {spec!r}: {len(harmful)} malicious / {len(benign)} benign prompts "
                                f"give {n} at ratio {malicious_ratio}, {n_mal} malicious and {n_ben} benign: one kind "
                                "would be missing; add prompts, or choose n or the ratio")
        if n_mal > len(harmful) or n_ben > len(benign):
            raise QrealignError(
                f"calibration set {spec!r} has {len(harmful)} malicious / {len(benign)} benign prompts; "
                f"n={n} at ratio {malicious_ratio} needs {n_mal} / {n_ben}")
        chosen = harmful[:n_mal] + benign[:n_ben]
    rng.shuffle(chosen)
    if not chosen:
        raise QrealignError(f"calibration set {spec!r} is empty")
    calib = CalibrationSet([p.text for p in chosen], [p.label for p in chosen], [p.id for p in chosen], split)
    if task and (task_n is None or task_n):
        calib = with_task_prompts(calib, task, CALIB_TASK_N if task_n is None else task_n)
    for source in [extra_benign] if isinstance(extra_benign, str) else extra_benign or ():
        calib = with_prompts(calib, source, label=0)
    for source in [extra_malicious] if isinstance(extra_malicious, str) else extra_malicious or ():
        calib = with_prompts(calib, source, label=1)
    return calib


def _load_spec(spec: str) -> tuple[list, str]:
    """(prompts, split name) of "qrealign:<split>" or a prompt file."""
    from ..data.prompts import HELD_OUT_SETS, SPLITS, SUPPLEMENTS, load_prompt_file, load_prompts, load_supplement

    try:
        if spec.startswith("qrealign:"):
            split = spec.split(":", 1)[1]
            if split == "eval" or split in HELD_OUT_SETS:
                raise ValueError(f"the {split} set is held out: it never enters calibration")
            if split in SUPPLEMENTS:
                return load_supplement(split), split
            if split not in SPLITS:  # the calibration names: the splits but eval, and the supplements
                names = [name for name in SPLITS if name != "eval"]
                raise ValueError(f"unknown prompt set {split!r}; for calibration: "
                                 f"{', '.join('qrealign:' + n for n in names)}, or a file (benign prompts only, "
                                 f"for --calib-benign: {', '.join('qrealign:' + n for n in SUPPLEMENTS)})")
            return load_prompts(split=split), split
        prompts = load_prompt_file(spec)
    except (ValueError, OSError) as exc:
        message = str(exc).removeprefix(f"{spec}: ")  # the loader names the file already
        raise QrealignError(f"calibration set {spec!r}: {message}") from None
    _refuse_held_out_prompts(spec, prompts)
    return prompts, f"file:{spec}"


def _refuse_held_out_prompts(spec: str, prompts) -> None:
    """A user file holding prompts of a bundled held-out set (the eval split, `HELD_OUT_SETS`)
    would make every later evaluation on it refuse to run (the overlap check): say so now, before
    hours of calibration."""
    from ..data.prompts import held_out_matches

    found = held_out_matches(prompts)
    if found:
        sets = " and ".join(f"{name} split" if name == "eval" else f"{name} set" for name in sorted({n for _, n in found}))
        raise QrealignError(f"calibration set {spec!r}: {len(found)} of its prompts are in qrealign's held-out {sets} "
                            f"(e.g. {found[0][0][:60]!r}); calibrating on them would void the evaluation: remove them")


def with_prompts(calib: CalibrationSet, spec: str, label: int) -> CalibrationSet:
    """`calib` plus every prompt of `spec` with this label (0 benign, 1 malicious) not already in it.

    "Already in it" is the same text (up to case and spacing), not the same id: two files both
    named prompts.jsonl give their prompts the same generated ids ("prompts-0000", ...). An id
    that names another text gets the source appended, so ids stay unique."""
    from ..data.prompts import normalize_prompt

    prompts, split = _load_spec(spec)
    kind = "malicious" if label == 1 else "benign"
    of_label = [p for p in prompts if p.label == label]
    if not of_label:
        raise QrealignError(f"calibration set {spec!r} has no {kind} (label {label}) prompts")
    seen_text = {normalize_prompt(t) for t in calib.prompts}
    seen_ids = set(calib.ids)
    extra = []
    for p in of_label:
        text = normalize_prompt(p.text)
        if text in seen_text:
            continue
        seen_text.add(text)
        pid = p.id if p.id not in seen_ids else f"{p.id}@{split}"
        seen_ids.add(pid)
        extra.append((pid, p.text))
    if not extra:
        raise QrealignError(f"calibration set {spec!r} adds no {kind} prompts: all {len(of_label)} are in the "
                            "calibration set already")
    return CalibrationSet(calib.prompts + [t for _, t in extra], calib.labels + [label] * len(extra),
                          calib.ids + [i for i, _ in extra], f"{calib.split}+{split}:{kind}")


def with_benign_prompts(calib: CalibrationSet, spec: str) -> CalibrationSet:
    """`calib` plus every benign prompt of `spec` not already in it."""
    return with_prompts(calib, spec, label=0)


def with_task_prompts(calib: CalibrationSet, task: str, n: int) -> CalibrationSet:
    """`calib` plus the first `n` "train" prompts of `task` as benign (label 0) samples."""
    from ..evaluate.tasks import get_task

    if n < 0:
        raise QrealignError(f"task_n must be >= 0, got {n}")
    task_obj = get_task(task)
    try:
        examples = task_obj.load("train", n)
    except ValueError as exc:
        raise QrealignError(f"calibration task {task!r}: {exc}") from None
    return CalibrationSet(calib.prompts + [e.prompt for e in examples], calib.labels + [0] * len(examples),
                          calib.ids + [e.id for e in examples], f"{calib.split}+{task_obj.name}:train[:{n}]")
