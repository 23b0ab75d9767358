"""`qrealign bench`: the authors' calibration schedule vs ours, same model, data and process.

Reference schedule (paper-spec §3.4, as published): batch size 1, every prompt right-padded to
128 tokens, MSE over all positions including padding, the FP stream for every sample, epochs
E-5 for the first half of the layers and E+5 for the rest (E = 10). Default schedule: the
project's (`CalibConfig()`: length bucketing, no fixed padding, batches of 4, padding excluded
from the loss, no FP stream for samples whose loss never reads it) at 2 epochs; `batch_size`
changes its batch (the numbers in docs/performance.md were measured at 8). Both optimise the same objective family (Q-realign
loss when probes are given, reconstruction otherwise).

Reported per schedule: wall time (total and per block), training steps and processed tokens,
tokens/s, achieved GFLOP/s against a torch.mm peak measured in the same run, peak RSS, and
quality proxies on held-out prompts (split "probe", never "eval"): relative block-output error
of benign prompts against the FP model and the mean probe logit of malicious prompts; with
`eval_n`, the behaviour itself (HS, over-refusal on a seeded sample of `eval_n` prompts per side
of the held-out eval split, across its harm categories, and topic-codes accuracy), measured only,
never tuned on.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .calibrate.data import build_calibration
from .calibrate.engine import CalibConfig, calibrate
from .calibrate.losses import ReconstructionLoss
from .calibrate.safety import SafetyLoss
from .models import get_blocks, load_model
from .models.chat import encode_prompts
from .errors import QrealignError
from .utils import position_ids_from_mask, resolve_device, write_report

REFERENCE = CalibConfig(batch_size=1, pad_to=128, padding_side="right", epochs=10, epoch_schedule="paper",
                        group_by_label=False)
DEFAULT = CalibConfig(epochs=2)  # the project's schedule: CalibConfig's defaults


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms). The
    process's, not the block's own: the second schedule starts from what the first left allocated
    (`qrealign bench --offload` runs each job in a fresh process where that matters)."""

    def __enter__(self):
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mm_peak_gflops(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def block_linear_params(model) -> int:
    block = get_blocks(model)[0]
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


@dataclass
class ScheduleResult:
    name: str
    seconds: float
    seconds_per_block: list[float]
    steps: int
    tokens: int
    tokens_per_s: float
    gflops: float
    peak_rss_gb: float
    benign_rel_error: float
    malicious_probe_logit: float | None
    evaluation: dict | None = None
    batch_size: int = 0
    epochs: int = 0


def run_bench(model_spec: str = "smollm2-135m", scheme: str = "W8A8", n: int = 40, probes=None,
              out: str | Path = "runs/bench", device=None, reference_epochs: int = 10, default_epochs: int = 2,
              heldout: int = 32, progress: bool = True, eval_n: int = 0, task_n: int = 200,
              batch_size: int | None = None) -> dict:
    from .quant.scheme import get_scheme
    from .realign import check_probe_system
    from .utils import check_report_dir

    if eval_n < 0 or n < 1:
        raise QrealignError(f"bench needs n >= 1 calibration prompts and eval_n >= 0, got n={n}, eval_n={eval_n}")
    schedules = {"reference": replace(REFERENCE, epochs=reference_epochs),  # replace() checks the values
                 "default": replace(DEFAULT, epochs=default_epochs,
                                    batch_size=DEFAULT.batch_size if batch_size is None else batch_size)}
    get_scheme(scheme)  # a typo fails here, not after the model loads and the FP pass
    check_report_dir(out)
    if probes is not None:
        check_probe_system(probes, DEFAULT.system)  # both schedules render as the probes were fit
    dev = resolve_device(device)
    torch.manual_seed(0)
    calib = build_calibration("qrealign:calib", n=n, malicious_ratio=0.75)
    peak = mm_peak_gflops(dev)
    from .data.prompts import load_prompts

    held_benign = [p.text for p in load_prompts(split="probe", label=0)][:heldout]
    held_mal = [p.text for p in load_prompts(split="probe", label=1)][:heldout]
    fp_model, tok = load_model(model_spec)
    if probes is not None:
        probes.check_compatible(fp_model)
    fp_states = _block_outputs(fp_model, tok, held_benign)
    del fp_model

    results = []
    for name, cfg in schedules.items():
        model, tok = load_model(model_spec)
        per_token_flops = 6 * block_linear_params(model)  # fwd + bwd of the linears, per token per block
        if probes is not None:
            loss = SafetyLoss.from_probes(probes, include_padding=(name == "reference"))
        else:
            loss = ReconstructionLoss(include_padding=(name == "reference"))
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            res = calibrate(model, tok, calib, scheme, cfg, loss=loss, device=dev, progress=progress)
            _sync(dev)
            seconds = time.perf_counter() - t0
        steps = sum(log.get("steps", 0) for log in res.layer_logs)
        tokens = sum(log.get("train_tokens", 0) for log in res.layer_logs)
        q_states = _block_outputs(model, tok, held_benign)
        rel = float(sum(((q - f).norm() / f.norm()).item() for q, f in zip(q_states, fp_states)) / len(fp_states))
        logit = _probe_logit(model, tok, held_mal, probes) if probes is not None else None
        evaluation = _behaviour(model, tok, eval_n, task_n) if eval_n else None
        results.append(ScheduleResult(name, round(seconds, 2), [log["seconds"] for log in res.layer_logs], steps,
                                      tokens, round(tokens / seconds, 1), round(tokens * per_token_flops / seconds / 1e9, 2),
                                      round(rss.peak / 2**30, 2), round(rel, 5),
                                      None if logit is None else round(logit, 4), evaluation,
                                      cfg.batch_size, cfg.epochs))
        del model
    ref, ours = results
    report = {
        "model": model_spec, "scheme": scheme, "calibration_prompts": n, "device": str(dev),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "mm_peak_gflops": round(peak, 2),
        "loss": "qrealign" if probes is not None else "reconstruction",
        "schedules": {r.name: r.__dict__ for r in results},
        "speedup": round(ref.seconds / ours.seconds, 2),
    }
    write_report(out, "bench", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    rows = [
        "| schedule | total s | s/block (mean) | steps | tokens | tokens/s | GFLOP/s (% of mm peak) | peak RSS GB | benign rel. error | malicious probe logit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["schedules"].values():
        pct = 100 * r["gflops"] / report["mm_peak_gflops"]
        logit = "—" if r["malicious_probe_logit"] is None else f"{r['malicious_probe_logit']:.3f}"
        rows.append(f"| {_label(r)} | {r['seconds']:.1f} | {sum(r['seconds_per_block']) / len(r['seconds_per_block']):.2f} "
                    f"| {r['steps']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} ({pct:.0f}%) "
                    f"| {r['peak_rss_gb']:.2f} | {r['benign_rel_error']:.4f} | {logit} |")
    head = (f"Model `{report['model']}`, scheme {report['scheme']}, {report['calibration_prompts']} calibration prompts, "
            f"{report['loss']} loss, device {report['device']}; torch.mm peak {report['mm_peak_gflops']:.1f} GFLOP/s.\n\n")
    evals = [r for r in report["schedules"].values() if r.get("evaluation")]
    if evals:
        rows += ["", "| schedule | HS % | over-refusal % | task accuracy % | eval prompts (harmful + benign) |",
                 "|---|---|---|---|---|"]
        for r in evals:
            e = r["evaluation"]
            fa = "—" if e.get("task_accuracy") is None else f"{e['task_accuracy']:.1f}"
            rows.append(f"| {r['name']} | {e['harmful_score']:.1f} | {e['over_refusal']:.1f} | {fa} | {e['n_harmful']} + {e['n_benign']} |")
    return head + "\n".join(rows) + f"\n\nSpeed-up of the default schedule: **{report['speedup']}x**.\n"


def _label(r: dict) -> str:
    """The schedule's name with its batch size and epochs (reports written before they were
    recorded show the name alone)."""
    return f"{r['name']} (batch {r['batch_size']}, E {r['epochs']})" if r.get("batch_size") else r["name"]


def _behaviour(model, tok, eval_n: int, task_n: int) -> dict:
    """HS / over-refusal on `eval_n` eval prompts per side (fewer where the split has fewer: the
    counts evaluated are recorded), and topic-codes accuracy. The prompts are a seeded sample
    across the file (`limited_classes`): the file is ordered by harm category, and its first 20
    harmful prompts were two categories (review 72)."""
    from .data.prompts import limited_classes, load_prompts
    from .evaluate.runner import evaluate_model

    harmful, benign = limited_classes(load_prompts(split="eval", label=1), load_prompts(split="eval", label=0), eval_n)
    metrics = evaluate_model(model, tok, harmful=harmful, benign=benign, task="topic-codes", task_n=task_n,
                             progress=False).metrics
    return {"harmful_score": metrics["harmful_score"], "over_refusal": metrics["over_refusal"],
            "task_accuracy": metrics.get("task_accuracy"), "n": eval_n,
            "n_harmful": metrics["n_harmful"], "n_benign": metrics["n_benign"]}


@torch.no_grad()
def _block_outputs(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    """Every block's output on real tokens of held-out prompts (left padding, positions from the mask)."""
    enc = encode_prompts(tok, prompts, padding_side="left")
    pos = position_ids_from_mask(enc.attention_mask)
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for b in get_blocks(model)]
    try:
        model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos)
    finally:
        for h in hooks:
            h.remove()
    mask = enc.attention_mask.bool()
    return [o[mask] for o in outs]


@torch.no_grad()
def _probe_logit(model, tok, prompts, probes) -> float:
    from .probes.capture import capture_last_token_states

    states = capture_last_token_states(model, tok, prompts)
    layers = probes.usable_layers or list(range(probes.num_layers))
    return float(sum(probes.logits(layer, states[layer]).mean().item() for layer in layers) / len(layers))
