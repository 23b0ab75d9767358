"""Separability analysis: how several models (aligned, attacked, realigned) look through one
probe set, layer by layer (paper §2.2 and its PCA figure).

Per model and layer: mean probe logit of harmful and of benign prompts, the probe's accuracy on
them, the share of harmful prompts on the class-1 side, and the Fisher ratio (Eq. 1) of the
model's own states. PCA axes are fit per layer on the first model's states and reused for every
other model, so the scatters show how the states *moved*, not a re-rotated picture.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from ..errors import QrealignError
from ..utils import atomic_dir, check_out_dir, write_json
from .capture import capture_last_token_states
from .fit import fisher_ratio
from .store import ProbeSet
from .targets import prompt_ids, prompt_texts

ModelSpec = Union[tuple, Callable[[], tuple]]  # (model, tokenizer) or a loader returning one


@dataclass
class PCABasis:
    """Per-layer centring vector and top-2 principal axes: [L, d] and [L, 2, d]."""

    mean: np.ndarray
    axes: np.ndarray

    @classmethod
    def fit(cls, harmful: np.ndarray, benign: np.ndarray) -> "PCABasis":
        means, axes = [], []
        for h, b in zip(harmful, benign):
            x = np.concatenate([h, b]).astype(np.float64)
            mu = x.mean(0)
            _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
            v = vt[:2]
            if v.shape[0] < 2:
                v = np.vstack([v, np.zeros((2 - v.shape[0], x.shape[1]))])
            # deterministic sign: the harmful mean projects positive on each axis
            sign = np.sign((h.mean(0) - mu) @ v.T)
            v = v * np.where(sign == 0, 1.0, sign)[:, None]
            means.append(mu)
            axes.append(v)
        return cls(np.stack(means), np.stack(axes))

    def project(self, k: int, x: np.ndarray) -> np.ndarray:
        return (x - self.mean[k]) @ self.axes[k].T


@dataclass
class ModelAnalysis:
    name: str
    layers: list[int]
    logit_harmful: list[float]
    logit_benign: list[float]
    acc: list[float]
    harmful_pos_rate: list[float]
    benign_pos_rate: list[float]
    fisher: list[float]
    n_harmful: int
    n_benign: int
    model: dict[str, Any] = field(default_factory=dict)
    pca_harmful: list[np.ndarray] = field(default_factory=list, repr=False)
    pca_benign: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        keys = ("name", "layers", "logit_harmful", "logit_benign", "acc", "harmful_pos_rate", "benign_pos_rate",
                "fisher", "n_harmful", "n_benign", "model")
        return {k: getattr(self, k) for k in keys}


@torch.no_grad()
def analyze_model(model, tokenizer, probes: ProbeSet, harmful: Sequence, benign: Sequence, name: str = "model",
                  layers: Sequence[int] | None = None, pca_basis: PCABasis | None = None, batch_size: int = 16,
                  device=None, system: str | None = None, max_length: int | None = None,
                  progress: bool = True) -> tuple[ModelAnalysis, PCABasis]:
    """One model through one probe set. Returns the analysis and the PCA basis used (fit on this
    model's states when none is given — pass it on to the next model)."""
    compat = probes.check_compatible(model)
    layers = probes.fitted_layers if layers is None else list(layers)
    if not layers:
        raise QrealignError("the probe set has no fitted layers")
    cap = dict(layers=layers, batch_size=batch_size, device=device, system=system, max_length=max_length,
               progress=progress)
    h = capture_last_token_states(model, tokenizer, prompt_texts(harmful), **cap)
    b = capture_last_token_states(model, tokenizer, prompt_texts(benign), **cap)
    zh, zb = probes.all_logits(h, layers).numpy(), probes.all_logits(b, layers).numpy()
    hn, bn = h.numpy().astype(np.float64), b.numpy().astype(np.float64)
    basis = pca_basis or PCABasis.fit(hn, bn)
    analysis = ModelAnalysis(
        name=name, layers=layers,
        logit_harmful=zh.mean(1).tolist(), logit_benign=zb.mean(1).tolist(),
        acc=(((zh > 0).sum(1) + (zb <= 0).sum(1)) / (zh.shape[1] + zb.shape[1])).tolist(),
        harmful_pos_rate=(zh > 0).mean(1).tolist(), benign_pos_rate=(zb > 0).mean(1).tolist(),
        fisher=[fisher_ratio(hn[k], bn[k]) for k in range(len(layers))],
        n_harmful=len(harmful), n_benign=len(benign),
        model={"fingerprint": compat["fingerprint"], "fingerprint_matches_probes": compat["fingerprint_match"],
               "model_type": getattr(model.config, "model_type", None)},
        pca_harmful=[basis.project(k, hn[k]).astype(np.float32) for k in range(len(layers))],
        pca_benign=[basis.project(k, bn[k]).astype(np.float32) for k in range(len(layers))],
    )
    return analysis, basis


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if digits else f"{x}"


def markdown_table(analyses: Sequence[ModelAnalysis], probes: ProbeSet) -> str:
    """Per layer: the probe's own held-out accuracy and, per model, mean harmful / benign logit and
    accuracy on the analysis prompts. Unusable layers are marked with *."""
    head = ["layer", "probe acc"] + [f"{a.name} {col}" for a in analyses for col in ("logit H", "logit B", "H>0", "acc")]
    lines = [f"Probe target: `{probes.target}`. probe acc: the probe's held-out accuracy on its own fit data "
             f"(class 1 = {probes.settings.get('classes', {}).get('1', '?')}). logit H / logit B: mean probe logit "
             "of harmful / benign prompts; H>0: share of harmful prompts on the class-1 side; acc: harmful > 0 and "
             "benign <= 0. `*` = layer marked not usable.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    metrics = {m.layer: m for m in probes.metrics}
    for k, layer in enumerate(analyses[0].layers):
        m = metrics.get(layer)
        mark = "" if m is None or m.usable else "*"
        row = [f"{layer}{mark}", f"{m.acc:.3f}" if m is not None and m.fitted else "–"]
        for a in analyses:
            row += [_fmt(a.logit_harmful[k]), _fmt(a.logit_benign[k]), f"{a.harmful_pos_rate[k]:.2f}", f"{a.acc[k]:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    usable = [k for k, layer in enumerate(analyses[0].layers) if metrics.get(layer) is not None and metrics[layer].usable]
    if usable:
        row = ["mean (usable)", f"{np.mean([metrics[analyses[0].layers[k]].acc for k in usable]):.3f}"]
        for a in analyses:
            row += [_fmt(float(np.mean([a.logit_harmful[k] for k in usable]))),
                    _fmt(float(np.mean([a.logit_benign[k] for k in usable]))),
                    f"{np.mean([a.harmful_pos_rate[k] for k in usable]):.2f}",
                    f"{np.mean([a.acc[k] for k in usable]):.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _materialize(spec: ModelSpec) -> tuple:
    return spec() if callable(spec) else spec


def analyze(models: dict[str, ModelSpec], probes: ProbeSet, harmful: Sequence, benign: Sequence,
            out_dir: str | Path, split: str | None = None, **kwargs) -> dict[str, Any]:
    """Run every model through `probes` and write `analysis.md`, `analysis.json` and PNGs
    (`logits.png`, `accuracy.png`, `fisher.png`, `pca_<name>.png`, `pca_compare.png`) to `out_dir`
    (atomically).

    `models` maps a display name to `(model, tokenizer)` or to a zero-argument loader returning one;
    loaders are called one at a time and their model released afterwards, so only one model is in
    memory. kwargs go to `analyze_model` (batch_size, device, system, max_length, layers, progress)."""
    from . import plots

    if not models:
        raise QrealignError("no models to analyse")
    check_plot_names(list(models))
    check_out_dir(out_dir, "analysis.json", kind="probe-analysis")  # before the captures
    analyses: list[ModelAnalysis] = []
    basis = None
    for name, spec in models.items():
        model, tokenizer = _materialize(spec)
        analysis, basis = analyze_model(model, tokenizer, probes, harmful, benign, name=name, pca_basis=basis, **kwargs)
        analyses.append(analysis)
        if callable(spec):
            del model, tokenizer
            gc.collect()
    report = {
        "kind": "probe-analysis",
        "probe_target": probes.target,
        "probe_model": probes.model,
        "split": split,
        "harmful_ids": prompt_ids(harmful),
        "benign_ids": prompt_ids(benign),
        "usable_layers": probes.usable_layers,
        "probe_acc": {m.layer: m.acc for m in probes.metrics if m.fitted},
        "models": [a.to_json() for a in analyses],
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, marker="analysis.json", kind="probe-analysis") as tmp:
        write_json(tmp / "analysis.json", report)
        (tmp / "analysis.md").write_text(markdown_table(analyses, probes))
        plots.plot_logit_curves(analyses, tmp / "logits.png", usable=probes.usable,
                                title=f"{probes.target} probe: mean logit per layer")
        plots.plot_accuracy_curves(analyses, tmp / "accuracy.png", probes=probes,
                                   title=f"{probes.target} probe: accuracy per layer")
        plots.plot_fisher_curves(analyses, tmp / "fisher.png")
        limits = plots.pca_limits(analyses)
        for a in analyses:
            plots.plot_pca_grid(a, tmp / f"pca_{plot_stem(a.name)}.png", limits=limits)
        plots.plot_pca_compare(analyses, tmp / "pca_compare.png", limits=limits)
    report["out_dir"] = str(out_dir)
    return report


def check_plot_names(names: list[str], flag: str = "model names") -> None:
    """Each model's PCA plot is named after it: "a b" and "a_b" would write one file, the second
    over the first."""
    stems = [plot_stem(n) for n in names]
    if len(set(stems)) != len(stems):
        raise QrealignError(f"{flag}: {names} give the same plot file name ({', '.join(stems)}); choose names that "
                            "differ in letters, digits, '-', '_' or '.'")


def plot_stem(name: str) -> str:
    """A model's display name as it appears in its plot's file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
