"""`ProbeSet`: one linear probe per decoder block, and how it is saved and checked.

Layout on disk (a directory, written atomically):

* `probes.safetensors` — `w` [L, d] float32 and `b` [L] float32, one row per decoder block of the
  model the probes were fit on. Row l applies to the *raw output of block l* (pre-final-norm for
  the last block): `logit = h @ w[l] + b[l]`, positive = the "push towards" side (harmful /
  refusing / aligned). Blocks that were not fit have a zero row and are not usable.
* `qrealign.json` — `kind: "probes"`, the target, model identity (fingerprint, type, sizes),
  per-layer metrics and the `usable` flag, the fit settings and the prompt provenance.

No pickle: the authors' `SLR_*.npy` dict-of-arrays format is deliberately not supported.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import IncompatibleArtifact, QrealignError
from ..utils import atomic_dir, read_json, save_tensors, write_json

FORMAT_VERSION = 1
TENSOR_FILE = "probes.safetensors"
META_FILE = "qrealign.json"
TARGETS = ("paper", "contrast", "refusal-direction")


@dataclass
class LayerMetrics:
    """How good the probe of one block is. Accuracies and mean logits are on held-out samples."""

    layer: int
    fitted: bool = True
    acc: float = float("nan")  # held-out accuracy at threshold 0
    train_acc: float = float("nan")
    auc: float = float("nan")  # held-out ROC AUC (threshold-free)
    bal_acc: float = float("nan")  # held-out balanced accuracy: the mean of the two classes' recalls
    converged: bool | None = None  # the L1 solver stopped before max_iter (None: no iterative solver)
    acc_matched: float | None = None  # held-out accuracy on class 1 + matched class-0 twins only
    cv_acc: float | None = None  # k-fold cross-validated accuracy over all samples (same grouping)
    nnz: int = 0  # non-zero weights
    w_norm: float = 0.0  # L2 norm of the raw-space weight vector
    fisher: float = float("nan")  # Eq. 1 separability ratio on all samples of this layer
    logit_pos: float = float("nan")  # mean held-out logit, class 1
    logit_neg: float = float("nan")  # mean held-out logit, class 0
    n_train: int = 0
    n_test: int = 0
    usable: bool = False
    reason: str = ""  # why a layer is not usable

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "LayerMetrics":
        kinds = {f.name: f.type for f in fields(cls)}
        # JSON has no NaN: plain-float metrics were written as null and come back as NaN.
        values = {k: (float("nan") if v is None and kinds[k] == "float" else v)
                  for k, v in data.items() if k in kinds}
        return cls(**values)


@dataclass
class ProbeSet:
    """Per-block linear probes plus everything needed to trust and reuse them.

    Read the probe of block l as `w[l]`, `b[l]` (or `logits(l, h)`); skip blocks where
    `usable[l]` is False (the `usable_layers` property lists the others)."""

    target: str
    w: torch.Tensor  # [num_layers, hidden_size] float32
    b: torch.Tensor  # [num_layers] float32
    metrics: list[LayerMetrics]  # one per block, in block order
    settings: dict[str, Any] = field(default_factory=dict)  # C, standardize, thresholds, seed, ...
    model: dict[str, Any] = field(default_factory=dict)  # fingerprint, model_type, source, ...
    data: dict[str, Any] = field(default_factory=dict)  # split ids, counts, provenance

    def __post_init__(self) -> None:
        if self.w.ndim != 2 or self.b.shape != (self.w.shape[0],):
            raise QrealignError(f"probe tensors have inconsistent shapes: w {tuple(self.w.shape)}, "
                                f"b {tuple(self.b.shape)}")
        if len(self.metrics) != self.w.shape[0]:
            raise QrealignError(f"{len(self.metrics)} layer metrics for {self.w.shape[0]} probe rows")
        self.w = self.w.detach().to("cpu", torch.float32).contiguous()
        self.b = self.b.detach().to("cpu", torch.float32).contiguous()

    # --- shape and selection -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.w.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w.shape[1]

    @property
    def usable(self) -> list[bool]:
        return [m.usable for m in self.metrics]

    @property
    def usable_layers(self) -> list[int]:
        """Block indices whose probe the quantizer may use (fitted, accurate, well-scaled)."""
        return [m.layer for m in self.metrics if m.usable]

    @property
    def fitted_layers(self) -> list[int]:
        return [m.layer for m in self.metrics if m.fitted]

    def logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Probe logit(s) of block `layer` for raw block outputs h [..., d], in float32 on h's device:
        the folded bias can be large against the logit (massive-activation channels), and a
        bf16 product would round the difference away."""
        w = self.w[layer].to(device=h.device, dtype=torch.float32)
        return h.float() @ w + self.b[layer].to(device=h.device, dtype=torch.float32)

    def all_logits(self, states: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Logits for captured states [len(layers), N, d] -> [len(layers), N] (float32)."""
        layers = list(range(self.num_layers)) if layers is None else layers
        w = self.w[layers].to(states.device)
        return torch.einsum("lnd,ld->ln", states.float(), w) + self.b[layers].to(states.device)[:, None]

    # --- compatibility ---------------------------------------------------------------------
    def check_compatible(self, model, expect_same_model: bool = False) -> dict[str, Any]:
        """Raise `IncompatibleArtifact` if the probes cannot apply to `model` (hidden size or number
        of decoder blocks differ). A different weight fingerprint is normal — the paper applies the
        aligned model's probes to the fine-tuned model — so it is only reported, and warned about
        only when `expect_same_model` is set (e.g. analysing the very model the probes came from).
        Returns {"fingerprint_match", "model_type_match", "fingerprint"}."""
        from ..models.registry import get_blocks
        from ..utils import model_fingerprint

        hidden = getattr(model.config, "hidden_size", None)
        num_layers = len(get_blocks(model))
        # which model, where several are checked (analyze)
        who = getattr(model.config, "qrealign_source", None) or getattr(model.config, "_name_or_path", None)
        this = f"this model ({who})" if who else "this model"
        if hidden != self.hidden_size:
            raise IncompatibleArtifact(
                f"probes were fit on hidden size {self.hidden_size} "
                f"({self.model.get('source') or self.model.get('model_type', '?')}), {this} has {hidden}")
        if num_layers != self.num_layers:
            raise IncompatibleArtifact(
                f"probes cover {self.num_layers} decoder blocks, {this} has {num_layers}")
        model_type = getattr(model.config, "model_type", None)
        type_match = self.model.get("model_type") in (None, model_type)
        if not type_match:
            warnings.warn(f"probes were fit on a {self.model.get('model_type')!r} model, applying them "
                          f"to {model_type!r} (same sizes)", stacklevel=2)
        fingerprint = model_fingerprint(model)
        same = self.model.get("fingerprint") in (None, fingerprint)
        if expect_same_model and not same:
            warnings.warn("model weights differ from the model the probes were fit on "
                          f"({fingerprint} vs {self.model.get('fingerprint')})", stacklevel=2)
        return {"fingerprint_match": same, "model_type_match": type_match, "fingerprint": fingerprint}

    def parents(self) -> list[str]:
        out = []
        for info in (self.model, self.model.get("finetuned") or {}):
            source = info.get("source")
            if source and Path(str(source)).expanduser().is_dir():
                out.append(str(Path(str(source)).expanduser().resolve()))
        return out

    # --- persistence -----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "kind": "probes",
            "format_version": FORMAT_VERSION,
            "qrealign_version": __version__,
            "target": self.target,
            "model_fingerprint": self.model.get("fingerprint"),
            "model_type": self.model.get("model_type"),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "layers": self.fitted_layers,
            "usable_layers": self.usable_layers,
            "model": self.model,
            "settings": self.settings,
            "C": self.settings.get("C"),
            "standardize": self.settings.get("standardize"),
            "data": self.data,
            "provenance": self.data.get("provenance") or {},
            # the model directories the probes were read from: their own provenance (e.g. the
            # prompts that aligned the model) is followed by `evaluate.overlap.collect_provenance`
            "parent": self.parents(),
            "metrics": [m.to_json() for m in self.metrics],
        }

    def write_files(self, directory: str | Path) -> None:
        """Write the two files into an existing directory (callers building a bigger output inside
        one `atomic_dir` use this; everyone else uses `save`)."""
        directory = Path(directory)
        save_tensors({"w": self.w, "b": self.b}, directory / TENSOR_FILE,
                     metadata={"kind": "probes", "format_version": str(FORMAT_VERSION)})
        write_json(directory / META_FILE, self.metadata())

    def save(self, out_dir: str | Path) -> Path:
        """Write `probes.safetensors` + `qrealign.json` to `out_dir`, atomically."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir, marker=META_FILE, kind="probes") as tmp:
            self.write_files(tmp)
        return out_dir

    def to_markdown(self) -> str:
        """Per-layer metrics table (held-out accuracy, matched-twin accuracy, AUC, sparsity, Fisher
        ratio, mean held-out logits, usable)."""
        def f(x, spec):
            return "–" if x is None or x != x else format(x, spec)
        head = "| layer | acc | cv acc | acc matched | AUC | nnz | Fisher | logit 1 | logit 0 | usable |"
        lines = [f"Probe target `{self.target}` ({self.settings.get('method', '?')}), "
                 f"{self.model.get('source') or self.model.get('model_type', '')}: "
                 f"{len(self.usable_layers)}/{self.num_layers} layers usable.", "", head, "|" + "---|" * 10]
        for m in self.metrics:
            if not m.fitted:
                lines.append(f"| {m.layer} | not fitted | | | | | | | | no |")
                continue
            lines.append(f"| {m.layer} | {f(m.acc, '.3f')} | {f(m.cv_acc, '.3f')} | {f(m.acc_matched, '.3f')} | {f(m.auc, '.3f')} | {m.nnz} "
                         f"| {f(m.fisher, '.3f')} | {f(m.logit_pos, '+.2f')} | {f(m.logit_neg, '+.2f')} "
                         f"| {'yes' if m.usable else 'no: ' + m.reason} |")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> "ProbeSet":
        path = Path(path)
        if path.is_file() and path.name in (TENSOR_FILE, META_FILE):
            path = path.parent
        meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise IncompatibleArtifact(f"{path} is not a probe directory (needs {META_FILE} and {TENSOR_FILE})")
        try:
            meta = read_json(meta_path)
        except ValueError as exc:  # a truncated or hand-edited file
            raise IncompatibleArtifact(f"{meta_path} is not valid JSON ({exc}); re-run `qrealign probe`") from None
        if not isinstance(meta, dict) or meta.get("kind") != "probes":
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise IncompatibleArtifact(f"{path} holds a {kind!r} artefact, not probes")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IncompatibleArtifact(f"{path}: probe format {meta.get('format_version')} is newer than "
                                       f"this qrealign understands ({FORMAT_VERSION}); upgrade qrealign")
        missing = [k for k in ("target", "num_layers", "hidden_size") if k not in meta]
        if missing:
            raise IncompatibleArtifact(f"{meta_path} lacks {', '.join(missing)}; re-run `qrealign probe`")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:
            raise IncompatibleArtifact(f"{tensor_path} is unreadable ({exc}); re-run `qrealign probe`") from None
        if "w" not in tensors or "b" not in tensors:
            raise IncompatibleArtifact(f"{tensor_path} lacks the 'w'/'b' tensors")
        metrics = [LayerMetrics.from_json(m) for m in meta.get("metrics", [])]
        if tuple(tensors["w"].shape) != (meta["num_layers"], meta["hidden_size"]):
            raise IncompatibleArtifact(f"{path}: w has shape {tuple(tensors['w'].shape)}, metadata says "
                                       f"[{meta['num_layers']}, {meta['hidden_size']}]")
        return cls(target=meta["target"], w=tensors["w"], b=tensors["b"], metrics=metrics,
                   settings=meta.get("settings", {}), model=meta.get("model", {}), data=meta.get("data", {}))


def load_probes(path: str | Path) -> ProbeSet:
    return ProbeSet.load(path)


def check_compatible(probes: ProbeSet, model, expect_same_model: bool = False) -> dict[str, Any]:
    """Function form of `ProbeSet.check_compatible`."""
    return probes.check_compatible(model, expect_same_model=expect_same_model)
