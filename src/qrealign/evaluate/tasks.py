"""Downstream tasks for fine-tuning accuracy (FA): one protocol, a registry, and loaders.

A task gives examples (`load(split, n)`) and scores one response (`score(response, example)`).
The project's offline task is `topic-codes` (qrealign.data.topic_task). SST-2, AG News and
GSM8K follow the harmful-fine-tuning literature (Vaccine / Lisa / Booster, which Q-realign's
fine-tuning code reuses): the same instructions, and for GSM8K the number after "The final answer
is:" (else the last number in the response), compared numerically.

They read the Hugging Face hub through `datasets` when it is installed, or local JSON/JSONL files
in the hub rows' shape (`{"sentence", "label"}`, `{"text", "label"}`, `{"question", "answer"}`):
`get_task("sst2:/data/sst2")` reads `/data/sst2/{split}.jsonl` (or `.json`), and a file path is
read whatever the split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from ..data.types import TaskExample
from ..errors import QrealignError


@runtime_checkable
class Task(Protocol):
    name: str
    max_new_tokens: int

    def load(self, split: str, n: int | None = None) -> list[TaskExample]: ...

    def score(self, response: str, example: TaskExample) -> bool: ...


# ---- reading rows --------------------------------------------------------------------------

def _need_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise QrealignError("loading a task from the Hugging Face hub needs the `datasets` package: "
                            "pip install datasets (or point the task at local JSON/JSONL files)") from None
    return datasets


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSON list (or {"data": [...]}) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise QrealignError(f"task file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        from ..data.prompts import not_utf8

        raise QrealignError(f"task file {path}: {not_utf8(path, exc)}") from None
    try:
        if path.suffix == ".jsonl" or (path.suffix != ".json" and not raw.lstrip().startswith("[")):
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            data = json.loads(raw)
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
    except json.JSONDecodeError as exc:
        raise QrealignError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise QrealignError(f"{path}: expected a list of objects (JSON list or one object per JSONL line)")
    return rows


def _local_file(source: Path, split: str) -> Path:
    if source.is_file():
        return source
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (source / name).is_file():
            return source / name
    raise QrealignError(f"no {split}.jsonl or {split}.json in {source}")


@dataclass
class HubTask:
    """A task whose rows come from a hub dataset or local files; subclasses turn rows into
    examples and score responses."""

    source: str | None = None  # None: the hub; else a directory of {split}.jsonl or a file
    hub_id: str = ""
    hub_config: str | None = None
    split_map: dict = field(default_factory=dict)  # project split -> hub split

    name = "hub-task"
    max_new_tokens = 16

    def rows(self, split: str) -> list[dict]:
        if self.source is not None:
            return read_rows(_local_file(Path(self.source).expanduser(), split))
        datasets = _need_datasets()
        hub_split = self.split_map.get(split, split)
        try:
            ds = datasets.load_dataset(self.hub_id, self.hub_config, split=hub_split)
        except Exception as exc:  # network, unknown split, ... : one line for the user
            raise QrealignError(f"could not load {self.hub_id} ({hub_split}): {str(exc).splitlines()[0]}") from None
        return [dict(r) for r in ds]

    def example(self, row: dict, index: int, split: str) -> TaskExample:
        raise NotImplementedError

    def load(self, split: str, n: int | None = None) -> list[TaskExample]:
        """The first `n` examples of `split` (all when n is None or larger than the split)."""
        if n is not None and n < 0:
            raise QrealignError(f"n must be >= 0, got {n}")
        rows = self.rows(split)
        if n is not None:
            rows = rows[:n]
        examples = []
        for i, r in enumerate(rows):
            try:
                examples.append(self.example(r, i, split))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise QrealignError(f"{self.name} {split}: row {i} does not have the expected fields and types "
                                    f"({type(exc).__name__}: {exc}); see qrealign.evaluate.tasks for the row "
                                    "shape") from None
        return examples


def _first_word(response: str, choices: dict[str, str], most: int | None = None) -> str | None:
    """The label whose pattern appears first in the response; None where more than `most`
    labels appear (a model that echoes the instruction's list of labels named no answer)."""
    found = {}
    for label, pattern in choices.items():
        m = re.search(pattern, response, re.IGNORECASE)
        if m:
            found[label] = m.start()
    if not found or (most is not None and len(found) > most):
        return None
    return min(found, key=found.get)


# ---- SST-2 ---------------------------------------------------------------------------------

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative.\n\nInput: {sentence}"
_SST2_LABELS = {0: "negative", 1: "positive"}


@dataclass
class SST2Task(HubTask):
    """SST-2 sentiment; the GLUE test split has no labels, so "test" reads "validation" (872)."""

    hub_id: str = "stanfordnlp/sst2"
    split_map: dict = field(default_factory=lambda: {"test": "validation"})
    name = "sst2"
    max_new_tokens = 8

    def example(self, row, index, split):
        label = row["label"]
        answer = _SST2_LABELS[_class_index(label)] if not isinstance(label, str) else label.strip().lower()
        if answer not in _SST2_LABELS.values():
            raise ValueError(f"label {label!r}")
        return TaskExample(prompt=SST2_INSTRUCTION.format(sentence=row["sentence"].strip()), answer=answer,
                           id=str(row.get("idx", row.get("id", f"sst2-{split}-{index}"))))

    def score(self, response: str, example: TaskExample) -> bool:
        # "not positive" names no label (review 84: it scored as positive)
        return _first_word(response, {v: rf"(?<!\bnot )\b{v}\b" for v in _SST2_LABELS.values()}) == example.answer


def _class_index(label) -> int:
    """A class number; 1.7 is not class 1 (int() would say it is)."""
    if isinstance(label, bool) or float(label) != int(label):
        raise ValueError(f"label {label!r} is not a class number")
    return int(label)


# ---- AG News -------------------------------------------------------------------------------

AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                      "World\nSports\nBusiness\nSci/Tech\n\nInput: {text}")
_AGNEWS_LABELS = {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}
_AGNEWS_PATTERNS = {"World": r"\bworld\b", "Sports": r"\bsports?\b", "Business": r"\bbusiness\b",
                    "Sci/Tech": r"\bsci(?:ence)?\s*/\s*tech\b|\bsci[- ]?tech\b|\bscience\b|\btechnology\b"}


@dataclass
class AGNewsTask(HubTask):
    hub_id: str = "fancyzhx/ag_news"
    name = "agnews"
    max_new_tokens = 8

    def example(self, row, index, split):
        label = row["label"]
        answer = _AGNEWS_LABELS[_class_index(label)] if not isinstance(label, str) else label
        if answer not in _AGNEWS_LABELS.values():
            raise ValueError(f"label {label!r}")
        return TaskExample(prompt=AGNEWS_INSTRUCTION.format(text=row["text"].strip()), answer=answer,
                           id=str(row.get("id", f"agnews-{split}-{index}")))

    def score(self, response: str, example: TaskExample) -> bool:
        return _first_word(response, _AGNEWS_PATTERNS, most=2) == example.answer  # the echoed list of 4: none


# ---- GSM8K ---------------------------------------------------------------------------------

# Commas inside a number join groups of two or more digits ("1,234", "1,00,000"); "1,2,3" is a list.
_NUMBER = re.compile(r"-?\$?\d+(?:,\d{2,})*(?:\.\d+)?")
_FINAL = re.compile(r"the final answer is\s*:?\s*", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", "").replace("$", ""))
    except ValueError:
        return None


def extract_gsm8k_answer(response: str) -> float | None:
    """The number after the last "The final answer is:", else the last number in the response."""
    parts = _FINAL.split(response)
    if len(parts) > 1:
        value = parse_number(parts[-1])
        if value is not None:
            return value
    numbers = _NUMBER.findall(response)
    return parse_number(numbers[-1]) if numbers else None


@dataclass
class GSM8KTask(HubTask):
    """GSM8K: gold answer after "####"; responses scored by numeric equality (tolerance 1e-6)."""

    hub_id: str = "openai/gsm8k"
    hub_config: str | None = "main"
    name = "gsm8k"
    max_new_tokens = 256

    def example(self, row, index, split):
        answer = str(row["answer"])
        gold = answer.split("####")[-1].strip() if "####" in answer else answer.strip()
        if parse_number(gold) is None:
            raise ValueError(f"answer {answer[-40:]!r} has no number")
        return TaskExample(prompt=row["question"].strip(), answer=gold.replace(",", ""),
                           id=str(row.get("id", f"gsm8k-{split}-{index}")))

    def score(self, response: str, example: TaskExample) -> bool:
        got, gold = extract_gsm8k_answer(response), parse_number(example.answer)
        return got is not None and gold is not None and abs(got - gold) < 1e-6


# ---- registry ------------------------------------------------------------------------------

def _topic_codes(source: str | None = None):
    from ..data.topic_task import TopicCodeTask

    if source:
        raise QrealignError("topic-codes is generated offline and takes no source")
    return TopicCodeTask()


_REGISTRY: dict[str, Callable[[str | None], Task]] = {
    "topic-codes": _topic_codes,
    "sst2": lambda source=None: SST2Task(source=source),
    "agnews": lambda source=None: AGNewsTask(source=source),
    "gsm8k": lambda source=None: GSM8KTask(source=source),
}
_ALIASES = {"ag_news": "agnews", "ag-news": "agnews", "sst-2": "sst2", "topic_codes": "topic-codes"}


def register_task(name: str, factory: Callable[[str | None], Task]) -> None:
    """Add a task: `factory(source)` builds it (source is what follows "name:" in the spec)."""
    _REGISTRY[name] = factory


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(spec: str | Task) -> Task:
    """"topic-codes", "sst2", "agnews", "gsm8k" (hub), or "sst2:/path/dir_or_file" (local)."""
    if not isinstance(spec, str):
        return spec
    name, _, source = spec.partition(":")
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in _REGISTRY:
        raise QrealignError(f"unknown task {name!r}; known: {', '.join(task_names())} (append :PATH for local files)")
    return _REGISTRY[name](source or None)


# ---- accuracy ------------------------------------------------------------------------------

def load_examples(task: Task | str, split: str = "test", n: int | None = None) -> list[TaskExample]:
    """`n` examples of the task's `split`, or a clear error (an unknown split, none there)."""
    task = get_task(task)
    try:
        examples = task.load(split, n)
    except ValueError as exc:  # the data layer's own loaders raise ValueError
        raise QrealignError(f"{task.name}: {exc}") from None
    if not examples:
        raise QrealignError(f"task {task.name} split {split!r} has no examples")
    return examples


def task_accuracy(model, tokenizer, task: Task | str, split: str = "test", n: int | None = None,
                  gen=None, progress: bool = True, examples: Sequence[TaskExample] | None = None) -> dict:
    """FA: generate for `n` examples of `split` and score them. Returns {"accuracy" (percent),
    "n", "correct", "task", "split", "records"} with one record per example. `examples`: those
    `load_examples` gave already (an evaluation loads them before generating anything)."""
    from dataclasses import replace

    from .generate import GenerationConfig, generate

    task = get_task(task)
    examples = list(examples) if examples is not None else load_examples(task, split, n)
    cfg = replace(gen or GenerationConfig(), max_new_tokens=task.max_new_tokens)
    responses = generate(model, tokenizer, [e.prompt for e in examples], cfg, progress=progress,
                         desc=f"task {task.name}")
    correct = [bool(task.score(r, e)) for r, e in zip(responses, examples)]
    return {
        "task": task.name, "split": split, "n": len(examples), "correct": sum(correct),
        "accuracy": 100.0 * sum(correct) / len(examples), "max_new_tokens": cfg.max_new_tokens,
        "records": [{"id": e.id, "prompt": e.prompt, "answer": e.answer, "response": r, "correct": c}
                    for e, r, c in zip(examples, responses, correct)],
    }


def score_responses(task: Task, responses: Sequence[str], examples: Sequence[TaskExample]) -> float:
    """Accuracy in percent of given responses (no generation)."""
    if len(responses) != len(examples) or not examples:
        raise QrealignError(f"{len(responses)} responses for {len(examples)} examples")
    return 100.0 * sum(bool(task.score(r, e)) for r, e in zip(responses, examples)) / len(examples)
