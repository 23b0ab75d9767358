"""`qrealign bench`: one benchmark per run (the default: the authors' calibration schedule vs the
project's), its numbers in `<out>/<stem>.json` and its table in `<stem>.md`."""

from __future__ import annotations

COMMAND = "bench"
ORDER = 40
HELP = ("benchmark: the authors' calibration schedule vs ours (default), or one lane vs two, disk offload, the "
        "SFT step's precision, evaluation decoding (JSON + Markdown)")

# The options each benchmark reads besides --out. Any other option given a non-default value is
# an error: a flag accepted and silently dropped reads as measured when it was not.
DEFAULTS = {"model": "smollm2-135m", "scheme": "W8A8", "n": 40, "probes": None, "reference_epochs": 10,
            "default_epochs": 2, "batch_size": None, "eval_n": 0, "device": None, "steps": 4}
READS = {
    "schedules": {"model", "scheme", "n", "probes", "reference_epochs", "default_epochs", "batch_size", "eval_n",
                  "device"},
    "offload": {"scheme", "n", "device"},
    "sft-precision": {"model", "steps", "device"},
    "decode": {"model", "n", "device"},
    "lanes": {"model", "scheme", "n", "device"},
}


def add_arguments(parser) -> None:
    d = DEFAULTS
    parser.add_argument("--model", default=d["model"], help="model to benchmark (not with --offload, which names it)")
    parser.add_argument("--scheme", default=d["scheme"])
    parser.add_argument("--n", type=int, default=d["n"],
                        help="calibration prompts (paper: 200); with --decode, dev prompts per side")
    parser.add_argument("--probes", default=d["probes"],
                        help="probe dir: benchmark the Q-realign loss (default: reconstruction)")
    parser.add_argument("--reference-epochs", type=int, default=d["reference_epochs"],
                        help="E of the reference schedule (paper: 10)")
    parser.add_argument("--default-epochs", type=int, default=d["default_epochs"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="batch of the project's schedule (default: CalibConfig's, 4)")
    parser.add_argument("--eval", type=int, default=d["eval_n"], dest="eval_n",
                        help="also evaluate both results: HS / over-refusal on up to N held-out prompts per side "
                             "(a seeded sample across the harm categories) + task accuracy")
    parser.add_argument("--device", default=d["device"])
    parser.add_argument("--steps", type=int, default=d["steps"], help="with --sft-precision: timed steps per precision")
    parser.add_argument("--out", default=None,
                        help="folder for the benchmark files (default: runs/bench, runs/bench-lanes, ... per mode)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lanes", action="store_true",
                      help="instead: time two calibrations (N prompts) and two generations in one lane vs two "
                           "(the demo's worker processes), and a calibration with / without the initial-loss pass")
    mode.add_argument("--offload", metavar="MODEL_DIR", default=None,
                      help="instead: peak memory and time of calibrations (RTN, OmniQuant; N prompts) and probe "
                           "capture of a local checkpoint, in memory vs --offload disk, each in a fresh process")
    mode.add_argument("--sft-precision", action="store_true",
                      help="instead: seconds per step of the lab's align SFT in float32 and (where native) under "
                           "bf16 autocast, and what amp='auto' picks here")
    mode.add_argument("--decode", action="store_true",
                      help="instead: greedy answers to N dev prompts per side with generate vs drop_finished "
                           "(stopped rows leave the batch): both times and how many answers differ; --model may "
                           "be a quantization run directory")


def mode_of(args) -> str:
    if args.offload:
        return "offload"
    if args.sft_precision:
        return "sft-precision"
    if args.decode:
        return "decode"
    return "lanes" if args.lanes else "schedules"


def check_options(args, mode: str) -> None:
    """Numbers in range, and no option the chosen benchmark would ignore."""
    from ..errors import QrealignError
    from ._options import changed_options

    for name in ("n", "steps", "reference_epochs", "default_epochs"):  # before any model loads
        if getattr(args, name) < 1:
            raise QrealignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reference_epochs < 6:  # in flags, before the engine says it in its own field names (review 81)
        raise QrealignError(f"--reference-epochs must be >= 6: the authors' schedule trains the first half of the "
                            f"blocks for epochs - 5 (paper: 10), got {args.reference_epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise QrealignError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval_n < 0:
        raise QrealignError(f"--eval must be >= 0, got {args.eval_n}")
    ignored = changed_options(args, DEFAULTS, keep=READS[mode], flags={"eval_n": "--eval"})
    if ignored:
        shown = "the default benchmark" if mode == "schedules" else f"--{mode}"
        raise QrealignError(f"{shown} does not read {', '.join(ignored)}")


def run(args) -> int:
    import importlib

    mode = mode_of(args)
    check_options(args, mode)
    # One benchmark per run (each runner checks its scheme and --out before any model loads): its module, runner, report file stem and the runner's arguments.
    if mode == "offload":
        module, runner, stem = "bench_offload", "run_offload_bench", "bench-offload"
        kwargs = dict(model_dir=args.offload, n=args.n, scheme=args.scheme, device=args.device)
    elif mode == "sft-precision":
        module, runner, stem = "bench_sft", "run_sft_bench", "bench-sft"
        kwargs = dict(model_spec=args.model, steps=args.steps, device=args.device)
    elif mode == "decode":
        module, runner, stem = "bench_decode", "run_decode_bench", "bench-decode"
        kwargs = dict(model_spec=args.model, n=args.n, device=args.device)
    elif mode == "lanes":
        module, runner, stem = "bench_lanes", "run_lanes_bench", "bench-lanes"
        kwargs = dict(model_spec=args.model, n_calib=args.n, scheme=args.scheme, device=args.device)
    else:
        probes = None
        if args.probes:
            from ..probes.store import load_probes

            probes = load_probes(args.probes)
        module, runner, stem = "bench", "run_bench", "bench"
        kwargs = dict(model_spec=args.model, scheme=args.scheme, n=args.n, probes=probes, device=args.device,
                      reference_epochs=args.reference_epochs, default_epochs=args.default_epochs,
                      eval_n=args.eval_n, batch_size=args.batch_size)
    out = args.out or f"runs/{stem}"  # each benchmark its own default folder
    bench = importlib.import_module(f"..{module}", __package__)
    report = getattr(bench, runner)(out=out, **kwargs)
    print(bench.markdown(report))
    print(f"wrote {out}/{stem}.json and {stem}.md")
    return 0
