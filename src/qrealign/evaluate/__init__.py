"""Evaluation: generation, judges, safety and task metrics, prompt sets, overlap checks, runner.

Light to import: the judge interface and the metrics are imported here; the runner's entry
points (`evaluate_model`, `evaluate_path`, `EvalResult`) and `GenerationConfig` load on first use.
"""

from .judges import Judge, KeywordJudge, Verdict, detect_refusal, get_judge
from .metrics import harmful_score, over_refusal, per_category, safety_metrics

__all__ = ["EvalResult", "GenerationConfig", "Judge", "KeywordJudge", "Verdict", "detect_refusal", "evaluate_model",
           "evaluate_path", "get_judge", "harmful_score", "over_refusal", "per_category", "safety_metrics"]

_LAZY = {"evaluate_model": "runner", "evaluate_path": "runner", "EvalResult": "runner", "GenerationConfig": "generate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
