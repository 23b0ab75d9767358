"""The model card (README.md) of an export: what was quantized, how, on which prompts, and what
the checkpoint computes compared with the model that was calibrated."""

from __future__ import annotations

from pathlib import Path

from .plan import ExportPlan


def shareable_source(source) -> str:
    """How an export names its source model in the files meant to travel (the card, config.json):
    a hub id or embedded name as is, a local path by its last component only, so a pushed export
    does not carry the user's directory layout (the run's own qrealign.json keeps the full path)."""
    text = str(source) if source else "unknown"
    if _is_hub_id(text) or not any(sep in text for sep in ("/", "\\")):
        return text
    return f"{Path(text).name} (local)"


def _is_hub_id(source: str) -> bool:
    """Only a hub id makes a meaningful `base_model`; local paths do not travel with the card."""
    from ..models.load import resolve_source

    try:
        return resolve_source(source).kind == "hub"
    except Exception:  # a path that is gone is simply not a hub id
        return False


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _grid(args, role: str) -> str:
    if args is None:
        return f"{role}: not quantized (computed in the storage dtype)"
    sym = "symmetric" if args.symmetric else "asymmetric (with zero points)"
    if role == "weights":
        where = f"one scale per group of {args.group_size} inputs" if args.strategy == "group" else \
            "one scale per output channel"
        return f"{role}: int{args.num_bits}, {sym}, {where}"
    return f"{role}: int{args.num_bits}, {sym}, dynamic per token (scale computed at run time for each token)"


def describe(plan: ExportPlan, calib_config: dict | None = None) -> list[str]:
    """Plain-language lines: what the exported model computes."""
    cfg = calib_config or {}
    if cfg.get("method") == "rtn":
        learned = "Round-to-nearest on each row's (or group's) min-max range: nothing learned, nothing folded."
    else:
        parts = []
        if cfg.get("let", True):
            parts.append("the learned smoothing scales (LET) are folded into the norm and linear weights")
        if cfg.get("lwc", True):
            parts.append("the learned clipping (LWC) is baked into the weight scales")
        learned = ("Q-realign's " + " and ".join(parts) + ", so no extra operator runs.") if parts else \
            "No learned transformation was used."
        if cfg.get("learn_rounding") and not any("learned rounding discarded" in d for d in plan.deviations):
            learned += " The learned rounding (floor or ceil, chosen per weight) is in the integer codes."
    return [
        "Every linear layer inside the decoder blocks (attention q/k/v/o and the MLP projections) stores "
        "integer weights; embeddings, norms and lm_head stay in " + plan.dtype + ".",
        _grid(plan.weights, "weights"),
        _grid(plan.activations, "input activations"),
        learned,
    ]


def render_card(meta: dict, plan: ExportPlan, sizes: dict, card_table: str | None = None) -> str:
    calib = meta.get("calibration") or {}
    prov = (meta.get("provenance") or {}).get("calibration") or {}
    source = meta.get("source") or "unknown"
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {source}"] if _is_hub_id(source) else []),
        "tags: [qrealign, compressed-tensors, quantized, " + plan.scheme.name.lower() + "]",
        "---",
        "",
        f"# {plan.scheme.name} quantization of {Path(str(source)).name or source} (qrealign)",
        "",
        "Quantized with [qrealign](https://arxiv.org/abs/2601.08089) (Q-realign: recovering safety "
        f"alignment while quantizing), method `{meta.get('method')}`, written in the compressed-tensors "
        f"`{plan.ct_format}` format.",
        "",
        "## What this checkpoint computes",
        "",
        *[f"- {line}" for line in describe(plan, meta.get("config"))],
        "",
    ]
    if plan.deviations:
        lines += ["Differences from the calibrated (fake-quantized) model:", "",
                  *[f"- {d}" for d in plan.deviations], ""]
    else:
        lines += ["It computes exactly the calibrated (fake-quantized) model's grid.", ""]
    lines += ["## Runtimes", "", *[f"- **{k}**: {v}" for k, v in plan.runtimes.items()], "",
              "```python",
              "from qrealign.models import load_model  # what the engines compute, on CPU",
              "model, tokenizer = load_model(PATH)",
              "# plain transformers: compressed-tensors' reference forward",
              "from transformers import AutoModelForCausalLM, CompressedTensorsConfig",
              "model = AutoModelForCausalLM.from_pretrained(PATH"
              + (")" if plan.activations is not None else
                 ", quantization_config=CompressedTensorsConfig(dequantize=True))"),
              "```", ""]
    lines += [
        "## Calibration",
        "",
        f"- source model: `{shareable_source(source)}`"
        + (f" with adapter `{shareable_source(meta['adapter'])}` merged" if meta.get("adapter") else ""),
        f"- calibration prompts: split `{calib.get('split', prov.get('split'))}`, "
        f"n = {calib.get('n', prov.get('n'))}, malicious ratio {_ratio(calib.get('malicious_ratio'))}",
        f"- scheme as calibrated: `{plan.scheme.name}`; run fingerprint `{meta.get('run_fingerprint')}`",
        "- the ids and text hashes of every prompt that built this model are in `qrealign.json` "
        "(`provenance`), so evaluations can check for train/test overlap; that file also names the "
        "local paths of the run and its models: edit or drop it before publishing if they are private",
        "",
        "## Size",
        "",
        "| checkpoint | size | this export is |",
        "|---|---|---|",
        f"| this export ({plan.dtype} + integer codes) | {_mb(sizes.get('export_bytes'))} | |",
        f"| source checkpoint ({sizes.get('source_dtype') or 'n/a'}) | {_mb(sizes.get('source_bytes'))} | "
        f"{_ratio(sizes.get('ratio_vs_source'))}x |",
        f"| same parameters in bf16 | {_mb(sizes.get('bf16_bytes'))} | {_ratio(sizes.get('ratio_vs_bf16'))}x |",
        "",
    ]
    if card_table:
        lines += ["## Evaluation", "", card_table.strip(), ""]
    return "\n".join(lines)
