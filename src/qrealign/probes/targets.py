"""The probe targets: which states are class 1 and which are class 0.

* `paper` — the aligned model's states on harmful (1) vs benign (0) prompts, L1 logistic
  regression (paper §3.1). Benign prompts that are matched twins of harmful ones (same phrasing,
  other topic) are kept in the same train/test group as their twin and scored separately
  (`acc_matched`): a generic benign set is separable from harmful prompts by phrasing alone.
* `contrast` — on the same harmful prompts, the aligned model's states (1) vs the fine-tuned
  model's states (0). Aims the quantizer at what fine-tuning changed instead of at harm
  recognition, which the paper's probe may still report after a mild break (efficacy notes §1–2).
* `refusal-direction` — dense difference of class means on the aligned model (harmful vs benign;
  or, given a fine-tuned model, aligned vs fine-tuned harmful states), bias at the midpoint or at
  the best training accuracy.

All three return a `ProbeSet` whose rows apply to raw block outputs of the model family.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import IncompatibleArtifact, QrealignError
from ..models.registry import architecture_difference, get_blocks
from ..utils import model_fingerprint, sha256_json
from .capture import capture_last_token_states, resolve_layers
from .fit import fit_probes
from .store import TARGETS, ProbeSet


def prompt_texts(prompts: Sequence) -> list[str]:
    return [getattr(p, "text", p) for p in prompts]


def prompt_ids(prompts: Sequence) -> list[str]:
    """Stable ids: the Prompt's own id, else a hash of the text."""
    return [getattr(p, "id", None) or f"text-{sha256_json(getattr(p, 'text', p), 12)}" for p in prompts]


def twin_groups(pos: Sequence, neg: Sequence) -> tuple[list[str], list[str], list[bool]]:
    """Split groups that keep every prompt with its matched twin (wherever the twin sits), and which
    class-0 prompts are twins of class-1 prompts (for `acc_matched`)."""
    p_ids, n_ids = prompt_ids(pos), prompt_ids(neg)
    present = set(p_ids) | set(n_ids)
    # Union-find over the twin links: a chain or two prompts naming one twin is one group, so no
    # pair of it is split between train and test. The group is named by its smallest id.
    parent: dict[str, str] = {}

    def root(i: str) -> str:
        while parent.get(i, i) != i:
            i = parent[i]
        return i

    for p, pid in list(zip(pos, p_ids)) + list(zip(neg, n_ids)):
        twin = getattr(p, "twin", None)
        if twin in present:
            a, b = root(pid), root(twin)
            if a != b:
                parent[max(a, b)] = min(a, b)
    pos_set = set(p_ids)
    matched = [getattr(p, "twin", None) in pos_set for p in neg]
    return [root(i) for i in p_ids], [root(i) for i in n_ids], matched


def describe_model(model, source: str | None = None) -> dict[str, Any]:
    config = model.config
    return {
        "source": source or getattr(config, "_name_or_path", None) or None,
        "fingerprint": model_fingerprint(model),
        "model_type": getattr(config, "model_type", None),
        "num_layers": len(get_blocks(model)),
        "hidden_size": getattr(config, "hidden_size", None),
    }


def provenance(stage: str, prompts: Sequence, split: str | None) -> dict[str, Any]:
    """Which prompts this artefact saw, in the project-wide format used to check that evaluation
    prompts never trained anything (`qrealign.evaluate.overlap`)."""
    from ..evaluate.overlap import provenance_entry

    return provenance_entry(stage, list(prompts), split)


def _prompt_data(split: str | None, **classes: Sequence) -> dict[str, Any]:
    data: dict[str, Any] = {"split": split}
    for name, prompts in classes.items():
        data[f"{name}_ids"] = prompt_ids(prompts)
    everything = [p for prompts in classes.values() for p in prompts]
    data["provenance"] = provenance("probes", everything, split)
    return data


def _capture_kwargs(kwargs: dict) -> dict:
    keys = ("batch_size", "device", "system", "max_length", "padding_side", "progress")
    return {k: kwargs[k] for k in keys if k in kwargs}


def _fit_kwargs(kwargs: dict) -> dict:
    keys = ("batch_size", "device", "system", "max_length", "padding_side")
    return {k: v for k, v in kwargs.items() if k not in keys}


def fit_paper_probes(model, tokenizer, harmful: Sequence, benign: Sequence, *, layers=None,
                     split: str | None = None, source: str | None = None, **kwargs) -> ProbeSet:
    """Paper target: SLR probes on the aligned model, harmful (1) vs benign (0).

    kwargs: capture options (batch_size, device, system, max_length, progress) and `fit_probes`
    options (C, standardize, test_size, seed, solver, min_accuracy, ...)."""
    return _fit_two_sets(model, tokenizer, harmful, benign, "paper", "slr", layers, split, source, kwargs)


def fit_refusal_direction_probes(model, tokenizer, harmful: Sequence, benign: Sequence | None = None, *,
                                 finetuned_model=None, labels: str = "prompt", judge=None, max_new_tokens: int = 48,
                                 layers=None, split: str | None = None, source: str | None = None,
                                 threshold: str = "midpoint", **kwargs) -> ProbeSet:
    """Refusal-direction target: difference of class means per layer.

    Classes, by `labels`:
    * "prompt" (default): the model's states on harmful (1) vs benign (0) prompts;
    * "behaviour": the model answers every prompt (greedy, `max_new_tokens`) and a judge (default
      the keyword refusal detector) reads the answers: harmful prompts it refused (1) vs benign
      prompts and harmful prompts it complied with (0); degenerate answers to harmful prompts are
      dropped. This is a direction of refusing, not of recognising harm;
    * with `finetuned_model`: aligned (1) vs fine-tuned (0) states on the harmful prompts."""
    kwargs["threshold"] = threshold
    if labels not in ("prompt", "behaviour"):
        raise QrealignError(f"labels must be 'prompt' or 'behaviour', got {labels!r}")
    if labels == "behaviour" and finetuned_model is not None:
        raise QrealignError("behaviour labels read the model's own answers; with finetuned_model the classes are "
                            "aligned vs fine-tuned states: give one of the two")
    if labels == "behaviour" and finetuned_model is None:
        if not benign:
            raise QrealignError("behaviour labels need benign prompts too")
        pos, neg, info = split_by_behaviour(model, tokenizer, harmful, benign, judge=judge,
                                            max_new_tokens=max_new_tokens, system=kwargs.get("system"),
                                            batch_size=kwargs.get("batch_size", 16),
                                            progress=kwargs.get("progress", True))
        probes = _fit_two_sets(model, tokenizer, pos, neg, "refusal-direction", "direction", layers, split, source,
                               kwargs)
        probes.settings["classes"] = {"1": "harmful prompts this model refused",
                                      "0": "benign prompts + harmful prompts this model complied with"}
        probes.settings["labels"] = "behaviour"
        probes.data["behaviour"] = info
        return probes
    if finetuned_model is None:
        if not benign:
            raise QrealignError("the refusal-direction target needs benign prompts (or a fine-tuned model)")
        return _fit_two_sets(model, tokenizer, harmful, benign, "refusal-direction", "direction", layers,
                             split, source, kwargs)
    return _fit_contrast(model, finetuned_model, tokenizer, harmful, "refusal-direction", "direction", layers,
                         split, source, kwargs)


def split_by_behaviour(model, tokenizer, harmful: Sequence, benign: Sequence, judge=None, max_new_tokens: int = 48,
                       system: str | None = None, batch_size: int = 16,
                       progress: bool = True) -> tuple[list, list, dict]:
    """(refused harmful prompts, benign + complied harmful prompts, counts) from the model's own
    greedy answers, judged by `judge` (default: the keyword refusal detector)."""
    from ..evaluate.generate import GenerationConfig, generate
    from ..evaluate.judges import KeywordJudge, get_judge

    judge = KeywordJudge() if judge is None else get_judge(judge)
    texts = prompt_texts(harmful)
    answers = generate(model, tokenizer, texts, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                                 system=system), progress=progress,
                       desc="answering harmful prompts")
    verdicts = judge.judge(texts, answers)
    refused = [p for p, v in zip(harmful, verdicts) if v.refused]
    complied = [p for p, v in zip(harmful, verdicts) if not (v.refused or v.degenerate or v.unjudged)]
    if len(refused) < 2:
        raise QrealignError(f"the model refused only {len(refused)} of {len(harmful)} harmful prompts: "
                            "no refusal behaviour to fit a direction to (use labels='prompt')")
    info = {"judge": judge.describe(), "max_new_tokens": max_new_tokens, "harmful_refused": len(refused),
            "harmful_complied": len(complied), "harmful_degenerate": sum(v.degenerate for v in verdicts),
            "harmful_unjudged": sum(v.unjudged for v in verdicts),
            "benign": len(benign)}
    return refused, list(benign) + complied, info


def fit_contrast_probes(aligned_model, finetuned_model, tokenizer, harmful_prompts: Sequence, *, layers=None,
                        split: str | None = None, source: str | None = None,
                        finetuned_source: str | None = None, **kwargs) -> ProbeSet:
    """Contrast target: SLR probes separating the aligned model's states (1) from the fine-tuned
    model's states (0) on the same harmful prompts. Both models share `tokenizer`: the quantizer
    feeds one token sequence to both."""
    probes = _fit_contrast(aligned_model, finetuned_model, tokenizer, harmful_prompts, "contrast", "slr", layers,
                           split, source, kwargs)
    if finetuned_source:
        probes.model["finetuned"]["source"] = finetuned_source
    return probes


def _fit_two_sets(model, tokenizer, harmful, benign, target, method, layers, split, source, kwargs) -> ProbeSet:
    num_layers = len(get_blocks(model))
    layer_ids = resolve_layers(layers, num_layers)
    cap = _capture_kwargs(kwargs)
    pos = capture_last_token_states(model, tokenizer, prompt_texts(harmful), layers=layer_ids, **cap)
    neg = capture_last_token_states(model, tokenizer, prompt_texts(benign), layers=layer_ids, **cap)
    groups_pos, groups_neg, matched = twin_groups(harmful, benign)
    probes = fit_probes(pos, neg, method=method, layers=layer_ids, num_layers=num_layers, target=target,
                        groups_pos=groups_pos, groups_neg=groups_neg,
                        matched_neg=matched if any(matched) else None, **_fit_kwargs(kwargs))
    probes.model = describe_model(model, source)
    probes.settings.update(classes={"1": "harmful prompts, this model", "0": "benign prompts, this model"},
                           system=cap.get("system"), max_length=cap.get("max_length"))
    probes.data.update(_prompt_data(split, harmful=harmful, benign=benign))
    probes.data["n_matched_benign"] = int(sum(matched))
    return probes


def _fit_contrast(aligned, finetuned, tokenizer, harmful, target, method, layers, split, source, kwargs) -> ProbeSet:
    num_layers = len(get_blocks(aligned))
    diff = architecture_difference(aligned, finetuned)
    if diff:
        raise IncompatibleArtifact(f"the aligned and fine-tuned models differ ({diff}); contrast probes need two "
                                   "versions of the same architecture")
    layer_ids = resolve_layers(layers, num_layers)
    cap = _capture_kwargs(kwargs)
    texts = prompt_texts(harmful)
    pos = capture_last_token_states(aligned, tokenizer, texts, layers=layer_ids, **cap)
    neg = capture_last_token_states(finetuned, tokenizer, texts, layers=layer_ids, **cap)
    groups = prompt_ids(harmful)  # both states of one prompt land on the same side of the split
    probes = fit_probes(pos, neg, method=method, layers=layer_ids, num_layers=num_layers, target=target,
                        groups_pos=groups, groups_neg=groups, **_fit_kwargs(kwargs))
    probes.model = describe_model(aligned, source)
    probes.model["finetuned"] = describe_model(finetuned)
    probes.settings.update(classes={"1": "harmful prompts, aligned model", "0": "harmful prompts, fine-tuned model"},
                           system=cap.get("system"), max_length=cap.get("max_length"))
    probes.data.update(_prompt_data(split, harmful=harmful))
    return probes


def fit_target(target: str, model, tokenizer, harmful: Sequence, benign: Sequence | None = None,
               finetuned_model=None, **kwargs) -> ProbeSet:
    """Dispatch on the target name (the CLI's `--target`)."""
    if target == "paper":
        if not benign:
            raise QrealignError("the paper target needs benign prompts")
        return fit_paper_probes(model, tokenizer, harmful, benign, **kwargs)
    if target == "contrast":
        if finetuned_model is None:
            raise QrealignError("the contrast target needs the fine-tuned model (--finetuned)")
        return fit_contrast_probes(model, finetuned_model, tokenizer, harmful, **kwargs)
    if target == "refusal-direction":
        return fit_refusal_direction_probes(model, tokenizer, harmful, benign, finetuned_model=finetuned_model,
                                            **kwargs)
    raise QrealignError(f"unknown probe target {target!r}; choose one of {', '.join(TARGETS)}")
