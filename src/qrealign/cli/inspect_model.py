"""`qrealign inspect MODEL`: what the registry sees in a model (and, for a quantization run, what
the run is and the base model it was calibrated on)."""

from __future__ import annotations

from ..errors import QrealignError

COMMAND = "inspect"
ORDER = 1
HELP = "show architecture, size and the smoothing pairs qrealign found"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="embedded name (smollm2-135m), model dir, .gguf file, hub id, or a quantization "
                                      "run (quantize / realign --out): the run and its base model")
    parser.add_argument("--adapter", help="PEFT adapter directory to merge on load")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    import json

    from ..models import block_pairs, get_arch, get_blocks, head_layout, load_model
    from ..models.load import load_skeleton

    run = _run_facts(args.model)
    if run is not None and args.adapter:
        raise QrealignError(f"{args.model} is a quantization run: its base model's adapter is the run's "
                            f"({run['adapter'] or 'none'}); drop --adapter")
    source, adapter = (run["base"], run["adapter"]) if run is not None else (args.model, args.adapter)
    # Without an adapter nothing here needs a weight: the config's modules on the meta device, so
    # a 70B model is inspected in seconds and without 280 GB of RAM.
    model = load_model(source, adapter=adapter)[0] if adapter else load_skeleton(source)
    spec = get_arch(model)
    layout = head_layout(model.config)
    info = {
        "model": args.model,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "layers": len(get_blocks(model)),
        "hidden_size": model.config.hidden_size,
        "heads": layout.num_heads,
        "kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "norm": "RMSNorm (1 + w)" if spec.norm_offset else "RMSNorm (w)",
        "quantized_linears": list(spec.linears),
        "smoothing_pairs": {k: {"smooth": s, "balance": list(b)} for k, (s, b) in block_pairs(model).items()},
    }
    exported = _export_facts(args.model)
    if exported:
        info["export"] = exported
    if run is not None:
        info["run"] = run
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if run is not None:
        _print_run(args.model, run)
    print(f"{source if run is not None else info['model']}: {info['architecture']} (model_type={info['model_type']})")
    print(f"  layers {info['layers']}, hidden {info['hidden_size']}, heads {layout.num_heads} "
          f"(kv {layout.num_kv_heads}, head_dim {layout.head_dim}), {info['parameters'] / 1e6:.1f}M parameters")
    print(f"  norm: {info['norm']}")
    print("  smoothing pairs (per block):")
    for name, pair in info["smoothing_pairs"].items():
        print(f"    {name:4s} {pair['smooth']} -> {', '.join(pair['balance'])}")
    if spec.notes:
        print(f"  notes: {spec.notes}")
    if exported:
        print(f"  quantized: a qrealign export, {exported['scheme']} {exported['format']} "
              f"({exported['ct_format']}), from the run {exported['run']} ({exported['method']})")
    return 0


def _run_facts(model: str) -> dict | None:
    """What a quantization run folder records about itself (None for anything else): its base
    model is what the rest of `inspect` describes, since the run holds parameters only."""
    from pathlib import Path

    from ..calibrate.artifact import base_needed, read_quantized_metadata, run_source
    from ..models.load import looks_like_path
    from ..utils import read_marker

    marker = read_marker(model)
    if marker is None or marker.get("kind") != "quantized":
        return None
    meta = read_quantized_metadata(model)  # says what is missing (the parameters file) in a broken run
    if not meta.get("source"):
        raise QrealignError(f"{model} is a quantization run of a model built in memory: it records no base model to "
                            "describe")
    probes = meta.get("probes") or {}
    objective = meta.get("objective") or (f"{probes.get('target')} probes" if probes else None)
    layers = meta.get("layers") or []
    base = run_source(meta, model)  # where the run's loaders find it (a run that moved with it: beside it)
    if looks_like_path(base) and not Path(base).exists():
        raise QrealignError(f"{model} is a quantization run whose base model {base} does not exist. {base_needed(base)}")
    return {"base": base, "adapter": meta.get("adapter"), "model_fingerprint": meta.get("model_fingerprint"),
            "scheme": (meta.get("scheme") or {}).get("name"), "method": meta.get("method"), "objective": objective,
            "safety_layers": meta.get("safety_layers"), "blocks": len(layers), "seconds": meta.get("seconds"),
            "calibration": meta.get("calibration"), "run_fingerprint": meta.get("run_fingerprint")}


def _print_run(folder: str, run: dict) -> None:
    calib = run["calibration"] or {}
    objective = f", {run['objective']} objective" if run["objective"] else ""
    adapter = f" + adapter {run['adapter']}" if run["adapter"] else ""
    took = f" in {run['seconds']:.0f} s" if run["seconds"] else ""
    safety = run["safety_layers"]
    term = f", the safety term on blocks {min(safety)}-{max(safety)}" if safety else ""
    print(f"{folder}: a qrealign quantization run ({run['scheme']}, {run['method']}{objective}), its learned "
          "parameters only")
    print(f"  base model: {run['base']}{adapter} (weights fingerprint {run['model_fingerprint']})")
    print(f"  {run['blocks']} blocks calibrated{took}{term}; calibration: {calib.get('n', '?')} prompts of "
          f"{calib.get('split', '?')!r}; run fingerprint {run['run_fingerprint']}")
    print("  read by: qrealign eval / export / analyze RUN, qrealign.calibrate.load_quantized(RUN)")


def _export_facts(model: str) -> dict | None:
    """A qrealign export is a model folder whose weights are integer codes: said, with its scheme."""
    from ..utils import read_marker

    meta = read_marker(model)  # none, or unreadable: the folder is inspected as a model, as before
    if meta is None or meta.get("kind") != "export":
        return None
    export = meta.get("export") or {}
    return {"scheme": export.get("scheme"), "format": export.get("format"), "ct_format": export.get("ct_format"),
            "run": meta.get("quantization_run"), "method": meta.get("method")}
