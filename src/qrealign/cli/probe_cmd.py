"""`qrealign probe MODEL --out DIR`: fit per-layer safety probes on a model.

Writes `probes.safetensors` + `qrealign.json` (what `qrealign realign` reads), plus
`probes.md` (per-layer metrics table) and `probe_metrics.png`.
"""

from __future__ import annotations

COMMAND = "probe"
ORDER = 20
HELP = "fit per-layer safety probes (paper SLR, contrast, or refusal direction)"
DESCRIPTION = (
    "Fit one linear probe per decoder block on the last prompt token's state. Targets: "
    "'paper' = L1 logistic regression, harmful vs benign prompts on the aligned MODEL (paper §3.1); "
    "'contrast' = L1 logistic regression, MODEL's (aligned) vs --finetuned model's states on the same "
    "harmful prompts; 'refusal-direction' = difference of means (harmful vs benign, or aligned vs "
    "fine-tuned when --finetuned is given). Layers whose held-out accuracy, balanced accuracy, AUC or "
    "cross-validated accuracy is below --min-accuracy are marked unusable for the quantizer."
)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the aligned model: embedded name, model dir, .gguf or hub id")
    parser.add_argument("--adapter", help="PEFT adapter to merge into MODEL on load")
    parser.add_argument("--target", default="paper", choices=("paper", "contrast", "refusal-direction"))
    parser.add_argument("--offload", choices=["disk"], default=None,
                        help="disk: keep the decoder blocks of MODEL (and --finetuned) in their safetensors files and "
                             "run the prompts block by block, reading each block once (models larger than CPU RAM; "
                             "not with adapters, GGUF or --labels behaviour)")
    parser.add_argument("--finetuned", help="the fine-tuned model (needed for --target contrast)")
    parser.add_argument("--finetuned-adapter", help="PEFT adapter to merge into --finetuned on load")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L1 strength of the SLR probes (default 1.0)")
    parser.add_argument("--no-standardize", dest="standardize", action="store_false",
                        help="fit on raw features like the authors (default: standardise, folded back into w, b)")
    parser.add_argument("--solver", default="liblinear", choices=("liblinear", "saga"))
    parser.add_argument("--threshold", default="midpoint", choices=("midpoint", "best"),
                        help="refusal-direction bias: class-mean midpoint or best training accuracy")
    parser.add_argument("--labels", default="prompt", choices=("prompt", "behaviour"),
                        help="refusal-direction classes: harmful vs benign prompts, or (behaviour) harmful prompts "
                             "MODEL refuses vs benign + complied ones, judged from its own greedy answers")
    parser.add_argument("--judge", default="keyword", help="judge for --labels behaviour (default: keyword)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length for --labels behaviour")
    parser.add_argument("--split", default="probe", help="bundled prompt split to fit on (default: probe)")
    parser.add_argument("--prompts", help="a prompt file (jsonl/json/csv with text + label) instead of --split")
    parser.add_argument("--limit", type=int, help="use at most this many prompts per class, drawn across the file "
                             "(seeded by --seed) with each kept harmful prompt's benign twin first (quick runs)")
    parser.add_argument("--layers", help="block indices and ranges, e.g. '3,5' or '10-29' (default: all)")
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cv", type=int, default=5,
                        help="k-fold cross-validated accuracy, required (with the held-out one) for a layer to be usable "
                             "(default 5; 0 = off)")
    parser.add_argument("--min-accuracy", type=float, default=0.75,
                        help="held-out accuracy (plain, balanced, AUC, cross-validated) below which a layer is marked "
                             "unusable (default 0.75)")
    parser.add_argument("--max-abs-logit", type=float, default=30.0,
                        help="mean |held-out logit| above which a layer is marked unusable (default 30)")
    parser.add_argument("--system", help="system prompt for the chat template (default: the model's own)")
    parser.add_argument("--max-length", type=int, help="truncate prompts to this many tokens (keeps the end)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--out", required=True, help="output directory")


# The target-specific options and their defaults, and which target reads which: another value
# for an option the target does not read is an error before any model loads (it was accepted and
# dropped, once after loading --finetuned for nothing).
TARGET_DEFAULTS = {"finetuned": None, "finetuned_adapter": None, "C": 1.0, "standardize": True,
                   "solver": "liblinear", "threshold": "midpoint", "labels": "prompt", "judge": "keyword",
                   "max_new_tokens": 48}
TARGET_READS = {
    "paper": {"C", "standardize", "solver"},
    "contrast": {"finetuned", "finetuned_adapter", "C", "standardize", "solver"},
    "refusal-direction": {"finetuned", "finetuned_adapter", "threshold", "labels", "judge", "max_new_tokens"},
}


def check_target_options(args) -> None:
    from ..errors import QrealignError
    from ._options import changed_options

    flags = {"standardize": "--no-standardize"}
    ignored = changed_options(args, TARGET_DEFAULTS, keep=TARGET_READS[args.target], flags=flags)
    if ignored:
        raise QrealignError(f"--target {args.target} does not read {', '.join(ignored)}")
    if args.target == "contrast" and not args.finetuned:
        raise QrealignError("--target contrast needs --finetuned MODEL2")
    if args.finetuned_adapter and not args.finetuned:
        raise QrealignError("--finetuned-adapter is merged into --finetuned: give --finetuned too")
    if args.target == "refusal-direction":
        if args.labels == "behaviour" and args.finetuned:
            raise QrealignError("--labels behaviour reads MODEL's own answers; with --finetuned the classes are "
                                "aligned vs fine-tuned states: drop one of the two")
        behaviour_only = {n: TARGET_DEFAULTS[n] for n in ("judge", "max_new_tokens")}
        unread = changed_options(args, behaviour_only) if args.labels != "behaviour" else []
        if unread:
            raise QrealignError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read by --labels "
                                "behaviour only")


def check_capture_numbers(args) -> None:
    """The numeric flags `probe` and `analyze` share, checked before any model loads (a zero batch
    size or length failed deep in the capture with a raw traceback; `--limit 0` meant "all")."""
    from ..errors import QrealignError

    for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-length", args.max_length, 1),
                             ("--max-new-tokens", getattr(args, "max_new_tokens", None), 1),
                             ("--cv", getattr(args, "cv", None), 0)):
        if value is not None and value < low:
            raise QrealignError(f"{flag} must be >= {low}, got {value}")
    if getattr(args, "cv", None) == 1:
        raise QrealignError("--cv 1 is no cross-validation: give 0 (off) or at least 2 folds")
    c = getattr(args, "C", None)
    if c is not None and not c > 0:
        raise QrealignError(f"--C must be > 0, got {c}")
    test_size = getattr(args, "test_size", None)
    if test_size is not None and not 0 < test_size < 1:
        raise QrealignError(f"--test-size must be in (0, 1), got {test_size}")
    min_acc = getattr(args, "min_accuracy", None)
    if min_acc is not None and not 0.5 <= min_acc < 1:  # below chance accepts noise; 1 or more rejects every layer
        raise QrealignError(f"--min-accuracy must be in [0.5, 1), got {min_acc}")


def load_prompt_classes(split: str | None, path: str | None, limit: int | None, seed: int = 0):
    """(harmful, benign, split name) from a prompt file or the bundled split; with `limit`, a
    seeded sample of each class (`limited_classes`)."""
    from ..data.prompts import limited_classes, load_prompt_file, load_prompts
    from ..errors import QrealignError

    if limit is not None and limit < 1:
        raise QrealignError(f"--limit must be >= 1, got {limit}")

    try:
        prompts = load_prompt_file(path) if path else load_prompts(split=split)
    except (OSError, ValueError) as exc:  # a missing file, bad JSON, an unknown split: say so, no traceback
        raise QrealignError(str(exc)) from None
    harmful = [p for p in prompts if p.label == 1]
    benign = [p for p in prompts if p.label == 0]
    if limit is not None:
        harmful, benign = limited_classes(harmful, benign, limit, seed)
    if not harmful:
        raise QrealignError(f"no harmful prompts in {path or 'split ' + repr(split)}")
    return harmful, benign, ("custom" if path else split)


def warn_held_out_prompts(prompts, source) -> None:
    """Probes fit on held-out prompts make every run realigned with them fail `qrealign eval` on
    that set (its overlap check reads the probes' provenance), hours later: said now, as for
    `--split eval`. Calibration refuses such files outright; probes only warn, since a user may
    fit them for analysis."""
    import warnings
    from collections import Counter

    from ..data.prompts import held_out_matches

    hits = Counter(name for _text, name in held_out_matches(prompts))
    if hits:
        sets = ", ".join(f"{n} in qrealign's held-out {name} set" for name, n in sorted(hits.items()))
        warnings.warn(f"{source}: {sets}: a model realigned with these probes will be refused by `qrealign eval` "
                      "on that set", stacklevel=2)


def run(args) -> int:
    from ..errors import QrealignError
    from ..models import load_model
    from ..probes import fit_target
    from ..probes.plots import plot_probe_metrics
    from ..probes.store import META_FILE
    from ..utils import atomic_dir, check_out_dir, resolve_device
    from ._layers import parse_layers

    check_target_options(args)
    check_capture_numbers(args)
    check_out_dir(args.out, META_FILE, kind="probes")
    device = resolve_device(args.device)
    harmful, benign, split = load_prompt_classes(args.split, args.prompts, args.limit, args.seed)
    if args.prompts:
        warn_held_out_prompts(harmful + benign, args.prompts)
    if split == "eval":
        import warnings

        warnings.warn("fitting probes on the held-out 'eval' split: a model realigned with them will be refused "
                      "by `qrealign eval` on that split (its overlap check sees the probes' prompts)", stacklevel=1)
    # Capturing states runs block by block on `device` from a model held on the CPU: a 7B model (two
    # for the contrast target) moved to the GPU whole would not fit a 24 GB card. The refusal
    # direction with behaviour labels generates answers first, which needs the whole model there.
    generates = args.target == "refusal-direction" and args.labels == "behaviour"
    home = device if generates or args.offload else "cpu"
    model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=home,
                                  offload=args.offload)
    finetuned = None
    if args.finetuned:
        finetuned, _ = load_model(args.finetuned, adapter=args.finetuned_adapter, dtype=args.dtype, device=home,
                                  offload=args.offload)
    kwargs = dict(layers=parse_layers(args.layers), split=split, source=args.model, batch_size=args.batch_size,
                  device=device,
                  system=args.system, max_length=args.max_length, test_size=args.test_size, seed=args.seed, cv=args.cv,
                  min_accuracy=args.min_accuracy, max_abs_logit=args.max_abs_logit)
    if args.target == "refusal-direction":
        kwargs.update(threshold=args.threshold, labels=args.labels, judge=args.judge,
                      max_new_tokens=args.max_new_tokens)
    else:
        kwargs.update(C=args.C, standardize=args.standardize, solver=args.solver)
    if args.target == "contrast":
        kwargs["finetuned_source"] = args.finetuned
    probes = fit_target(args.target, model, tokenizer, harmful, benign, finetuned_model=finetuned, **kwargs)
    if args.adapter:
        probes.model["adapter"] = args.adapter
    with atomic_dir(args.out, marker=META_FILE, kind="probes") as tmp:
        probes.write_files(tmp)
        (tmp / "probes.md").write_text(probes.to_markdown())
        plot_probe_metrics(probes, tmp / "probe_metrics.png")
    print(probes.to_markdown())
    print(f"wrote {args.out} ({len(probes.usable_layers)}/{probes.num_layers} layers usable)")
    return 0
