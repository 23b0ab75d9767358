"""`qrealign bench`: reference (authors') schedule vs the project's default, same run."""

from __future__ import annotations

COMMAND = "bench"
ORDER = 40
HELP = ("benchmark the calibration engine: authors' schedule vs ours, or one lane vs two, or evaluation "
        "decoding (JSON + Markdown)")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", default="W8A8")
    parser.add_argument("--n", type=int, default=40, help="calibration prompts (paper: 200)")
    parser.add_argument("--probes", default=None, help="probe dir: benchmark the Q-realign loss (default: reconstruction)")
    parser.add_argument("--reference-epochs", type=int, default=10, help="E of the reference schedule (paper: 10)")
    parser.add_argument("--default-epochs", type=int, default=2)
    parser.add_argument("--eval", type=int, default=0, dest="eval_n",
                        help="also evaluate both results: HS / over-refusal on N held-out prompts per side + task accuracy")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/bench", help="folder for the benchmark files (default: runs/bench)")
    parser.add_argument("--lanes", action="store_true",
                        help="instead: time two calibrations (N prompts) and two generations in one lane vs two "
                             "(the demo's worker processes), and a calibration with / without the initial-loss pass")
    parser.add_argument("--offload", metavar="MODEL_DIR", default=None,
                        help="instead: peak memory and time of calibrations (RTN, OmniQuant; N prompts) and probe "
                             "capture of a local checkpoint, in memory vs --offload disk, each in a fresh process")
    parser.add_argument("--sft-precision", action="store_true",
                        help="instead: seconds per step of the lab's align SFT in float32 and (where native) under "
                             "bf16 autocast, and what amp='auto' picks here")
    parser.add_argument("--decode", action="store_true",
                        help="instead: greedy answers to N dev prompts per side with generate vs drop_finished "
                             "(stopped rows leave the batch): both times and how many answers differ; --model may "
                             "be a quantization run directory")
    parser.add_argument("--steps", type=int, default=4, help="with --sft-precision: timed steps per precision")


def run(args) -> int:
    import importlib

    from ..errors import QrealignError

    for name in ("n", "steps", "reference_epochs", "default_epochs"):  # before any model loads
        if getattr(args, name) < 1:
            raise QrealignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_n < 0:
        raise QrealignError(f"--eval must be >= 0, got {args.eval_n}")

    # One benchmark per run: its module, runner, report file stem and the runner's arguments.
    if args.offload:
        module, runner, stem = "bench_offload", "run_offload_bench", "bench-offload"
        kwargs = dict(model_dir=args.offload, n=args.n, scheme=args.scheme)
    elif args.sft_precision:
        module, runner, stem = "bench_sft", "run_sft_bench", "bench-sft"
        kwargs = dict(model_spec=args.model, steps=args.steps, device=args.device)
    elif args.decode:
        module, runner, stem = "bench_decode", "run_decode_bench", "bench-decode"
        kwargs = dict(model_spec=args.model, n=args.n, device=args.device)
    elif args.lanes:
        module, runner, stem = "bench_lanes", "run_lanes_bench", "bench-lanes"
        kwargs = dict(model_spec=args.model, n_calib=args.n, scheme=args.scheme)
    else:
        probes = None
        if args.probes:
            from ..probes.store import load_probes

            probes = load_probes(args.probes)
        module, runner, stem = "bench", "run_bench", "bench"
        kwargs = dict(model_spec=args.model, scheme=args.scheme, n=args.n, probes=probes, device=args.device,
                      reference_epochs=args.reference_epochs, default_epochs=args.default_epochs, eval_n=args.eval_n)
    out = args.out if args.out != "runs/bench" else f"runs/{stem}"  # each benchmark its own default folder
    bench = importlib.import_module(f"..{module}", __package__)
    report = getattr(bench, runner)(out=out, **kwargs)
    print(bench.markdown(report))
    print(f"wrote {out}/{stem}.json and {stem}.md")
    return 0
