"""`qrealign export RUN_DIR --format compressed-tensors --out OUT`: a quantization run as a real
quantized checkpoint that transformers, vLLM and SGLang load."""

from __future__ import annotations

COMMAND = "export"
ORDER = 25
HELP = "write a quantization run as a compressed-tensors checkpoint (int8 W8A8, packed W4A16)"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="quantization run directory (from `qrealign quantize` or `qrealign realign`)")
    parser.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"],
                        help="checkpoint format (default compressed-tensors)")
    parser.add_argument("--out", required=True, help="output model directory (written atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of embeddings, norms, lm_head and scales (default bfloat16; float32 is "
                             "bit-faithful to the calibrated model)")
    parser.add_argument("--symmetric-weights", action="store_true",
                        help="re-quantize asymmetric weights symmetrically (vLLM's int8 W8A8 needs it; inexact, recorded)")
    parser.add_argument("--symmetric-activations", action="store_true",
                        help="declare per-token activations symmetric (inexact for asymmetric runs, recorded)")
    parser.add_argument("--offload", choices=["disk"], default=None,
                        help="disk: read the source model one decoder block at a time and write one shard per block "
                             "(models larger than CPU RAM; same checkpoint; not for runs on GGUF or with an adapter)")
    parser.add_argument("--card-table", help="Markdown file (e.g. a before/after evaluation table) for the model card")
    parser.add_argument("--json", action="store_true", help="print the export summary as JSON")


def run(args) -> int:
    import json

    from ..export import export_compressed_tensors
    from ..utils import read_user_text

    table = read_user_text(args.card_table, "--card-table") if args.card_table else None
    result = export_compressed_tensors(args.run_dir, args.out, dtype=args.dtype,
                                       symmetric_weights=args.symmetric_weights,
                                       symmetric_activations=args.symmetric_activations, card_table=table,
                                       offload=args.offload)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    plan, sizes = result.plan, result.sizes
    print(f"wrote {result.out_dir}: {plan.scheme.name} as compressed-tensors {plan.ct_format}, {plan.dtype}")
    mib = sizes["export_bytes"] / 2**20
    ref = f", {sizes['ratio_vs_source']:.2f}x the source checkpoint ({sizes['source_dtype']})" \
        if sizes.get("ratio_vs_source") else ""
    print(f"  size {mib:.1f} MiB = {sizes['ratio_vs_bf16']:.2f}x bf16{ref}")
    print("  matches the calibrated grid" if plan.matches_calibration else "  re-expressed: NOT the calibrated grid")
    for d in plan.deviations:
        print(f"  differs: {d}")
    for name, note in plan.runtimes.items():
        print(f"  {name}: {note}")
    return 0
