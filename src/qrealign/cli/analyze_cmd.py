"""`qrealign analyze MODEL... --probes DIR --out DIR`: several models through one probe set.

Writes `analysis.md` / `analysis.json` (per-layer mean probe logit of harmful and benign prompts,
accuracy, Fisher ratio, per model) and PNGs: `logits.png`, `accuracy.png`, `fisher.png`, one
per-layer PCA grid per model (`pca_<name>.png`, shared axes) and `pca_compare.png` (models x layers).
"""

from __future__ import annotations

COMMAND = "analyze"
ORDER = 21
HELP = "per-layer probe logits, accuracy and PCA plots for several models (aligned, attacked, realigned)"


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="models to compare (first = PCA reference)")
    parser.add_argument("--probes", required=True, help="probe directory written by `qrealign probe`")
    parser.add_argument("--names", help="comma-separated display names, one per MODEL")
    parser.add_argument("--adapters", help="comma-separated PEFT adapter directories, one per MODEL, merged on load; "
                                           "leave an entry empty for a model without one (e.g. ',lora-dir')")
    parser.add_argument("--split", default="eval", help="bundled prompt split (default: eval, held out)")
    parser.add_argument("--prompts", help="a prompt file (text + label) instead of --split")
    parser.add_argument("--limit", type=int, help="use at most this many prompts per class, drawn across the file "
                             "(seeded by --seed) with each kept harmful prompt's benign twin first (as `qrealign "
                             "probe --limit`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0, as probe's)")
    parser.add_argument("--layers", help="block indices and ranges, e.g. '3,5' or '10-29' (default: every fitted layer)")
    parser.add_argument("--system", help="system prompt (default: the one the probes were fit with)")
    parser.add_argument("--max-length", type=int, help="truncate prompts to this many tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True, help="output directory")


def run(args) -> int:
    from pathlib import Path

    from ..errors import QrealignError
    from ..models.load import check_adapter_dir
    from ..probes import ProbeSet
    from ..probes.analyze import analyze, check_plot_names
    from ..utils import resolve_device
    from ._layers import parse_layers
    from ._lists import one_per, split_list
    from .probe_cmd import check_capture_numbers, load_prompt_classes

    check_capture_numbers(args)
    probes = ProbeSet.load(args.probes)
    names = one_per(args.names, args.models, "--names", [Path(m).name or m for m in args.models])
    check_plot_names(names, "--names" if args.names else "the model names (pass --names)")  # before any load
    adapters = [a or None for a in split_list(args.adapters, keep_empty=True)] if args.adapters \
        else [None] * len(args.models)
    if len(adapters) != len(args.models):
        raise QrealignError(f"--adapters has {len(adapters)} entries for {len(args.models)} models "
                            "(leave an entry empty for a model without an adapter)")
    for adapter in filter(None, adapters):  # fail before the first model is captured, not at the third
        check_adapter_dir(adapter)
    harmful, benign, split = load_prompt_classes(args.split, args.prompts, args.limit, args.seed)
    if not benign:
        raise QrealignError("the analysis needs benign prompts too")
    device = resolve_device(args.device)
    models = {name: (lambda source=source, adapter=adapter: _load(source, args.dtype, device, adapter))
              for name, source, adapter in zip(names, args.models, adapters)}
    system = args.system if args.system is not None else probes.settings.get("system")
    max_length = args.max_length if args.max_length is not None else probes.settings.get("max_length")
    report = analyze(models, probes, harmful, benign, args.out, split=split, layers=parse_layers(args.layers),
                     batch_size=args.batch_size, system=system, max_length=max_length)
    print((Path(args.out) / "analysis.md").read_text())
    print(f"wrote {report['out_dir']}")
    return 0


def _load(source: str, dtype, device, adapter: str | None = None):
    """A model dir / name, or a quantization run directory (rebuilt with its fake quantization),
    so a realigned model can be compared with its aligned and attacked parents."""
    from ..evaluate.runner import load_for_eval

    model, tokenizer, _, _ = load_for_eval(source, adapter=adapter, device=device, dtype=dtype or "float32")
    return model, tokenizer
