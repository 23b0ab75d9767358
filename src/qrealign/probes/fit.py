"""Fitting per-layer probes on captured states: the paper's sparse logistic regression (SLR) and a
dense difference-of-means direction, with the same held-out metrics for both.

Labels: 1 = the side the quantizer pushes harmful prompts towards (harmful / aligned / refusing),
0 = the other side. Every returned probe applies to *raw* block outputs: when features are
standardised for fitting (the paper fits on raw features, where a few massive-activation
dimensions dominate the L1 path), the scaling is folded back into `w` and `b`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import QrealignError
from .store import LayerMetrics, ProbeSet

DEFAULT_MIN_ACCURACY = 0.75
# Mean |held-out logit| above this marks a probe as ill-conditioned: the quantizer's softplus
# loss is flat there, and tiny activation changes swing the logit by tens (efficacy notes §5).
DEFAULT_MAX_ABS_LOGIT = 30.0
FISHER_EPS = 1e-8


# --- data split ------------------------------------------------------------------------------
@dataclass
class Split:
    """Row indices of each class that go to training and to the held-out test set."""

    train_pos: np.ndarray
    test_pos: np.ndarray
    train_neg: np.ndarray
    test_neg: np.ndarray


def split_indices(n_pos: int, n_neg: int, test_size: float = 0.2, seed: int = 0,
                  groups_pos: Sequence[Hashable] | None = None,
                  groups_neg: Sequence[Hashable] | None = None) -> Split:
    """Seeded train/test split. Without groups: stratified (each class keeps its ratio). With
    groups: whole groups go to one side, so a harmful prompt and its matched benign twin (or the
    aligned and fine-tuned states of one prompt) are never split between train and test."""
    if not 0.0 < test_size < 1.0:
        raise QrealignError(f"test_size must be in (0, 1), got {test_size}")
    if n_pos < 2 or n_neg < 2:
        raise QrealignError(f"need at least 2 samples per class to fit and test a probe (got {n_pos} / {n_neg})")
    rng = np.random.default_rng(seed)
    if groups_pos is None and groups_neg is None:
        def one(n):
            perm = rng.permutation(n)
            k = min(n - 1, max(1, math.ceil(test_size * n)))
            return np.sort(perm[k:]), np.sort(perm[:k])
        tr_p, te_p = one(n_pos)
        tr_n, te_n = one(n_neg)
        return Split(tr_p, te_p, tr_n, te_n)
    gp = list(groups_pos) if groups_pos is not None else [("pos", i) for i in range(n_pos)]
    gn = list(groups_neg) if groups_neg is not None else [("neg", i) for i in range(n_neg)]
    if len(gp) != n_pos or len(gn) != n_neg:
        raise QrealignError("one group label per sample is needed")
    unique = sorted(set(gp) | set(gn), key=repr)
    perm = rng.permutation(len(unique))
    k = max(1, math.ceil(test_size * len(unique)))
    test_groups = {unique[i] for i in perm[:k]}
    te_p = np.array([i for i, g in enumerate(gp) if g in test_groups], dtype=int)
    tr_p = np.array([i for i, g in enumerate(gp) if g not in test_groups], dtype=int)
    te_n = np.array([i for i, g in enumerate(gn) if g in test_groups], dtype=int)
    tr_n = np.array([i for i, g in enumerate(gn) if g not in test_groups], dtype=int)
    if min(len(te_p), len(tr_p), len(te_n), len(tr_n)) == 0:
        raise QrealignError("the grouped split left a class without training or test samples; "
                            "use more prompts or a different test_size")
    return Split(tr_p, te_p, tr_n, te_n)


def cv_folds(n_pos: int, n_neg: int, folds: int, seed: int = 0,
             groups_pos: Sequence[Hashable] | None = None,
             groups_neg: Sequence[Hashable] | None = None) -> list[Split]:
    """k-fold cross-validation splits over all samples (grouped like `split_indices`): a steadier
    accuracy estimate than one 20 % hold-out of a few dozen prompts."""
    gp = list(groups_pos) if groups_pos is not None else [("pos", i) for i in range(n_pos)]
    gn = list(groups_neg) if groups_neg is not None else [("neg", i) for i in range(n_neg)]
    rng = np.random.default_rng(seed + 1)
    if groups_pos is None and groups_neg is None:  # stratified: deal each class round-robin
        fold_p = np.empty(n_pos, int)
        fold_p[rng.permutation(n_pos)] = np.arange(n_pos) % folds
        fold_n = np.empty(n_neg, int)
        fold_n[rng.permutation(n_neg)] = np.arange(n_neg) % folds
    else:
        unique = sorted(set(gp) | set(gn), key=repr)
        fold_of = {unique[j]: k % folds for k, j in enumerate(rng.permutation(len(unique)))}
        fold_p = np.array([fold_of[g] for g in gp])
        fold_n = np.array([fold_of[g] for g in gn])
    out = []
    for k in range(folds):
        split = Split(np.flatnonzero(fold_p != k), np.flatnonzero(fold_p == k),
                      np.flatnonzero(fold_n != k), np.flatnonzero(fold_n == k))
        if min(len(split.train_pos), len(split.train_neg)) > 0 and len(split.test_pos) + len(split.test_neg) > 0:
            out.append(split)
    return out


# --- metrics ---------------------------------------------------------------------------------
def fisher_ratio(pos: np.ndarray, neg: np.ndarray, eps: float = FISHER_EPS) -> float:
    """Paper Eq. 1: ||mu_1 - mu_0||^2 / (mean over all samples of ||h - mu_class(h)||^2 + eps)."""
    mu_p, mu_n = pos.mean(0), neg.mean(0)
    within = np.concatenate([((pos - mu_p) ** 2).sum(1), ((neg - mu_n) ** 2).sum(1)]).mean()
    return float(((mu_p - mu_n) ** 2).sum() / (within + eps))


def _auc(z_pos: np.ndarray, z_neg: np.ndarray) -> float:
    """P(z_pos > z_neg) + 0.5 P(tie): the Mann-Whitney form of ROC AUC."""
    diff = z_pos[:, None] - z_neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def layer_metrics(layer: int, w: np.ndarray, b: float, pos: np.ndarray, neg: np.ndarray, split: Split,
                  matched_neg: np.ndarray | None = None, min_accuracy: float = DEFAULT_MIN_ACCURACY,
                  max_abs_logit: float = DEFAULT_MAX_ABS_LOGIT, cv_acc: float | None = None,
                  converged: bool | None = None) -> LayerMetrics:
    """Held-out quality of one raw-space probe (w, b), and whether the quantizer may use it.

    The gate reads the balanced accuracy and the AUC, not only the plain accuracy: with classes
    4:1 a probe that calls everything the majority class has accuracy 0.8 (review 67). On a
    balanced hold-out the balanced accuracy is the accuracy."""
    z_pos, z_neg = pos @ w + b, neg @ w + b
    te_p, te_n = z_pos[split.test_pos], z_neg[split.test_neg]
    tr_p, tr_n = z_pos[split.train_pos], z_neg[split.train_neg]
    acc = float(((te_p > 0).sum() + (te_n <= 0).sum()) / (len(te_p) + len(te_n)))
    bal_acc = float(0.5 * ((te_p > 0).mean() + (te_n <= 0).mean()))
    auc = _auc(te_p, te_n)
    train_acc = float(((tr_p > 0).sum() + (tr_n <= 0).sum()) / (len(tr_p) + len(tr_n)))
    acc_matched = None
    if matched_neg is not None:
        held = split.test_neg[matched_neg[split.test_neg]]
        if len(held):
            zm = z_neg[held]
            acc_matched = float(((te_p > 0).sum() + (zm <= 0).sum()) / (len(te_p) + len(zm)))
    mean_abs = float(np.abs(np.concatenate([te_p, te_n])).mean())
    reasons = []
    if not np.isfinite(w).all() or not math.isfinite(b):
        reasons.append("non-finite weights")
    if acc < min_accuracy:
        reasons.append(f"held-out accuracy {acc:.2f} < {min_accuracy:.2f}")
    if bal_acc < min_accuracy <= acc:
        reasons.append(f"held-out balanced accuracy {bal_acc:.2f} < {min_accuracy:.2f}")
    if auc < min_accuracy:
        reasons.append(f"held-out AUC {auc:.2f} < {min_accuracy:.2f}")
    if cv_acc is not None and cv_acc < min_accuracy:
        reasons.append(f"cross-validated accuracy {cv_acc:.2f} < {min_accuracy:.2f}")
    if mean_abs > max_abs_logit:
        reasons.append(f"mean |logit| {mean_abs:.1f} > {max_abs_logit:g}")
    if not np.any(w):
        reasons.append("all weights zero")
    return LayerMetrics(
        layer=layer, fitted=True, acc=acc, train_acc=train_acc, auc=auc, bal_acc=bal_acc, converged=converged,
        acc_matched=acc_matched,
        nnz=int(np.count_nonzero(w)), w_norm=float(np.linalg.norm(w)), fisher=fisher_ratio(pos, neg),
        cv_acc=cv_acc, logit_pos=float(te_p.mean()), logit_neg=float(te_n.mean()),
        n_train=len(split.train_pos) + len(split.train_neg), n_test=len(te_p) + len(te_n),
        usable=not reasons, reason="; ".join(reasons),
    )


# --- fitting -----------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise QrealignError(f"features must be [layers, samples, hidden], got shape {x.shape}")
    return x


def standardizer(x: np.ndarray, min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (floored) std per feature; constant features get std 1 so they stay harmless."""
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > min_std * max(1.0, float(sd.max(initial=0.0))), sd, 1.0)
    return mu, sd


def fold_standardization(w_std: np.ndarray, b_std: float, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, float]:
    """A probe on (h - mu) / sd as a probe on raw h: w = w_std / sd, b = b_std - mu . w."""
    w = w_std / sd
    return w, float(b_std - mu @ w)


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float = 1.0, standardize: bool = True,
                 solver: str = "liblinear", max_iter: int = 2000, class_weight: str | None = "balanced",
                 seed: int = 0, info: dict | None = None) -> tuple[np.ndarray, float]:
    """One L1 logistic regression; returns raw-space (w, b).

    `liblinear` is the default (50x faster than `saga` at d=576 and converges exactly); it
    penalises the intercept as a synthetic feature, so `intercept_scaling` is raised to make that
    penalty negligible. `saga` (the authors' solver) is available for faithfulness; on raw
    features with a massive-activation channel it can stop at `max_iter`, not sparse yet. sklearn's
    warning is silenced because it would repeat per fold: `info`, when given, receives
    `converged` and `n_iter`, and `fit_probes` records and reports them per layer."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu, sd = standardizer(x) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    xs = (x - mu) / sd
    kwargs = dict(C=C, solver=solver, max_iter=max_iter, class_weight=class_weight, random_state=seed)
    if solver == "liblinear":
        kwargs["intercept_scaling"] = 10.0
    # sklearn >= 1.8 spells the pure-L1 penalty l1_ratio=1 (penalty= is deprecated there); before
    # 1.8 l1_ratio is read only with penalty="elasticnet", so passing it alone fits a dense L2 model.
    if _sklearn_version() >= (1, 8):
        clf = LogisticRegression(l1_ratio=1.0, **kwargs)
    else:
        clf = LogisticRegression(penalty="l1", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(xs, y)
    if info is not None:
        n_iter = int(np.max(clf.n_iter_))
        info.update(n_iter=n_iter, converged=n_iter < max_iter)
    return fold_standardization(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), mu, sd)


def _sklearn_version() -> tuple[int, int]:
    import sklearn

    major, minor = (sklearn.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def fit_direction(pos: np.ndarray, neg: np.ndarray, threshold: str = "midpoint") -> tuple[np.ndarray, float]:
    """Dense difference-of-means direction, scaled so that logits are in units of the pooled
    within-class standard deviation of the projection (a margin of 1 = one spread), with the
    threshold at the midpoint of the projected class means or at the best training balanced
    accuracy (plain accuracy would put the cut past every sample of the smaller class when the
    classes are unbalanced and barely separated)."""
    diff = pos.mean(0) - neg.mean(0)
    norm = np.linalg.norm(diff)
    if norm == 0:
        raise QrealignError("the two classes have identical means: no direction to fit")
    u = diff / norm
    pp, pn = pos @ u, neg @ u
    spread = math.sqrt(0.5 * (pp.var() + pn.var())) or 1.0
    w = u / spread
    mid = 0.5 * (pp.mean() + pn.mean()) / spread
    if threshold == "midpoint":
        return w, float(-mid)
    if threshold != "best":
        raise QrealignError(f"threshold must be 'midpoint' or 'best', got {threshold!r}")
    zp, zn = pp / spread, pn / spread
    cands = np.unique(np.concatenate([zp, zn]))
    cuts = np.concatenate([[cands[0] - 1.0], 0.5 * (cands[1:] + cands[:-1]), [cands[-1] + 1.0]])
    correct = (zp[None, :] > cuts[:, None]).mean(1) + (zn[None, :] <= cuts[:, None]).mean(1)
    best = np.flatnonzero(np.isclose(correct, correct.max(), rtol=0, atol=1e-12))
    cut = cuts[best[np.argmin(np.abs(cuts[best] - mid))]]  # ties: the cut closest to the midpoint
    return w, float(-cut)


def fit_probes(features_pos, features_neg, C: float = 1.0, standardize: bool = True, test_size: float = 0.2,
               seed: int = 0, *, method: str = "slr", layers: Sequence[int] | None = None,
               num_layers: int | None = None, groups_pos: Sequence[Hashable] | None = None,
               groups_neg: Sequence[Hashable] | None = None, matched_neg: Sequence[bool] | None = None,
               solver: str = "liblinear", max_iter: int = 2000, class_weight: str | None = "balanced",
               threshold: str = "midpoint", min_accuracy: float = DEFAULT_MIN_ACCURACY,
               max_abs_logit: float = DEFAULT_MAX_ABS_LOGIT, cv: int = 5, target: str = "paper",
               progress: bool = True) -> ProbeSet:
    """Fit one probe per layer on features [L, N1, d] (class 1) and [L, N0, d] (class 0).

    `method="slr"`: the paper's L1 logistic regression (C, standardize, solver). `method="direction"`:
    the dense difference-of-means direction (`threshold` = "midpoint" | "best"). `layers` gives the
    block index of each feature row (default 0..L-1) and `num_layers` the model's block count; rows of
    blocks not fitted stay zero and unusable. The split is the same for every layer (see
    `split_indices`); `matched_neg` flags class-0 samples that are matched twins of class-1 ones,
    for the `acc_matched` metric. `cv` > 1 also reports k-fold cross-validated accuracy over all
    samples (`cv_acc`, same grouping), which must pass `min_accuracy` too: one 20 % hold-out of a
    few dozen prompts moves by ±0.07. The stored probe is the one fit on the training split."""
    pos, neg = _as_numpy(features_pos), _as_numpy(features_neg)
    if pos.shape[0] != neg.shape[0] or pos.shape[2] != neg.shape[2]:
        raise QrealignError(f"feature shapes differ: {pos.shape} vs {neg.shape}")
    if method not in ("slr", "direction"):
        raise QrealignError(f"unknown probe method {method!r}")
    n_rows, d = pos.shape[0], pos.shape[2]
    layers = list(range(n_rows)) if layers is None else [int(l) for l in layers]
    if len(layers) != n_rows:
        raise QrealignError(f"{len(layers)} layer ids for {n_rows} feature rows")
    num_layers = num_layers if num_layers is not None else max(layers) + 1
    if max(layers) >= num_layers:
        raise QrealignError(f"layer {max(layers)} >= num_layers {num_layers}")
    if min(layers) < 0 or len(set(layers)) != len(layers):  # a -1 or a repeat would overwrite another row
        raise QrealignError(f"layer ids must be distinct block indices >= 0, got {layers}")
    split = split_indices(pos.shape[1], neg.shape[1], test_size, seed, groups_pos, groups_neg)
    matched = None if matched_neg is None else np.asarray(matched_neg, dtype=bool)
    if matched is not None and len(matched) != neg.shape[1]:
        raise QrealignError("matched_neg needs one flag per class-0 sample")

    w_all = np.zeros((num_layers, d))
    b_all = np.zeros(num_layers)
    metrics = [LayerMetrics(layer=l, fitted=False, reason="not fitted") for l in range(num_layers)]
    folds = cv_folds(pos.shape[1], neg.shape[1], cv, seed, groups_pos, groups_neg) if cv and cv > 1 else []

    def fit_one(p: np.ndarray, n: np.ndarray, sp: Split, info: dict | None = None) -> tuple[np.ndarray, float]:
        if method == "direction":
            return fit_direction(p[sp.train_pos], n[sp.train_neg], threshold=threshold)
        x = np.concatenate([p[sp.train_pos], n[sp.train_neg]])
        y = np.concatenate([np.ones(len(sp.train_pos)), np.zeros(len(sp.train_neg))])
        return fit_logistic(x, y, C=C, standardize=standardize, solver=solver, max_iter=max_iter,
                            class_weight=class_weight, seed=seed, info=info)

    unconverged = []
    for row, layer in enumerate(tqdm(layers, desc=f"fitting {method} probes", unit="layer", disable=not progress)):
        p, n = pos[row], neg[row]
        info: dict = {}
        w, b = fit_one(p, n, split, info)
        if info.get("converged") is False:
            unconverged.append(layer)
        cv_acc = None
        if folds:
            correct = total = 0
            for sp in folds:
                wf, bf = fit_one(p, n, sp)
                correct += int((p[sp.test_pos] @ wf + bf > 0).sum() + (n[sp.test_neg] @ wf + bf <= 0).sum())
                total += len(sp.test_pos) + len(sp.test_neg)
            cv_acc = correct / total
        w_all[layer], b_all[layer] = w, b
        metrics[layer] = layer_metrics(layer, w, b, p, n, split, matched, min_accuracy, max_abs_logit, cv_acc,
                                       converged=info.get("converged"))
    if unconverged:
        warnings.warn(f"the {solver} solver stopped at max_iter={max_iter} before converging on layers {unconverged} "
                      "(recorded per layer as converged=False): its L1 weights are not sparse yet; raise max_iter or "
                      "standardize the features", stacklevel=2)

    settings = {"method": method, "test_size": test_size, "seed": seed, "cv_folds": len(folds), "min_accuracy": min_accuracy,
                "max_abs_logit": max_abs_logit, "grouped_split": groups_pos is not None or groups_neg is not None}
    if method == "slr":
        settings.update(C=C, standardize=standardize, solver=solver, max_iter=max_iter, class_weight=class_weight,
                        penalty="l1")
    else:
        settings.update(threshold=threshold, scale="pooled within-class std of the projection")
    data = {"n_pos": int(pos.shape[1]), "n_neg": int(neg.shape[1]),
            "holdout": {"train_pos": split.train_pos.tolist(), "test_pos": split.test_pos.tolist(),
                      "train_neg": split.train_neg.tolist(), "test_neg": split.test_neg.tolist()}}
    return ProbeSet(target=target, w=torch.from_numpy(w_all).float(), b=torch.from_numpy(b_all).float(),
                    metrics=metrics, settings=settings, data=data)


def fit_refusal_direction(features_pos, features_neg, test_size: float = 0.2, seed: int = 0,
                          threshold: str = "midpoint", **kwargs) -> ProbeSet:
    """Difference-of-means probes (see `fit_direction`) with the same split and metrics as the SLR."""
    kwargs.setdefault("target", "refusal-direction")
    return fit_probes(features_pos, features_neg, test_size=test_size, seed=seed, method="direction",
                      threshold=threshold, **kwargs)
