"""`qrealign inspect MODEL`: what the registry sees in a model."""

from __future__ import annotations

COMMAND = "inspect"
ORDER = 1
HELP = "show architecture, size and the smoothing pairs qrealign found"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="embedded name (smollm2-135m), model dir, .gguf file or hub id")
    parser.add_argument("--adapter", help="PEFT adapter directory to merge on load")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    import json

    from ..models import block_pairs, get_arch, get_blocks, head_layout, load_model
    from ..models.load import load_skeleton

    # Without an adapter nothing here needs a weight: the config's modules on the meta device, so
    # a 70B model is inspected in seconds and without 280 GB of RAM.
    model = load_model(args.model, adapter=args.adapter)[0] if args.adapter else load_skeleton(args.model)
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
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']}: {info['architecture']} (model_type={info['model_type']})")
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


def _export_facts(model: str) -> dict | None:
    """A qrealign export is a model folder whose weights are integer codes: said, with its scheme."""
    from ..utils import read_marker

    meta = read_marker(model)  # none, or unreadable: the folder is inspected as a model, as before
    if meta is None or meta.get("kind") != "export":
        return None
    export = meta.get("export") or {}
    return {"scheme": export.get("scheme"), "format": export.get("format"), "ct_format": export.get("ct_format"),
            "run": meta.get("quantization_run"), "method": meta.get("method")}
