"""`qrealign bench`: reference (authors') schedule vs the project's default, same run."""

from __future__ import annotations

COMMAND = "bench"
ORDER = 40
HELP = "benchmark the calibration engine: authors' schedule vs ours, or one lane vs two (JSON + Markdown)"


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
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--lanes", action="store_true",
                        help="instead: time two calibrations (N prompts) and two generations in one lane vs two "
                             "(the demo's worker processes), and a calibration with / without the initial-loss pass")
    parser.add_argument("--offload", metavar="MODEL_DIR", default=None,
                        help="instead: peak memory and time of calibrations (RTN, OmniQuant; N prompts) and probe "
                             "capture of a local checkpoint, in memory vs --offload disk, each in a fresh process")
    parser.add_argument("--sft-precision", action="store_true",
                        help="instead: seconds per step of the lab's align SFT in float32 and (where native) under "
                             "bf16 autocast, and what amp='auto' picks here")
    parser.add_argument("--steps", type=int, default=4, help="with --sft-precision: timed steps per precision")


def run(args) -> int:
    from ..bench import markdown, run_bench

    if args.offload:
        from ..bench_offload import markdown as offload_markdown, run_offload_bench

        out = args.out if args.out != "runs/bench" else "runs/bench-offload"
        report = run_offload_bench(args.offload, n=args.n, scheme=args.scheme, out=out)
        print(offload_markdown(report))
        print(f"wrote {out}/bench-offload.json and bench-offload.md")
        return 0
    if args.sft_precision:
        from ..bench_sft import markdown as sft_markdown, run_sft_bench

        out = args.out if args.out != "runs/bench" else "runs/bench-sft"
        report = run_sft_bench(args.model, steps=args.steps, device=args.device, out=out)
        print(sft_markdown(report))
        print(f"wrote {out}/bench-sft.json and bench-sft.md")
        return 0
    if args.lanes:
        from ..bench_lanes import markdown as lanes_markdown, run_lanes_bench

        report = run_lanes_bench(args.model, n_calib=args.n, scheme=args.scheme, out=args.out)
        print(lanes_markdown(report))
        print(f"wrote {args.out}/bench-lanes.json and bench-lanes.md")
        return 0

    probes = None
    if args.probes:
        from ..probes.store import load_probes

        probes = load_probes(args.probes)
    report = run_bench(args.model, args.scheme, args.n, probes, args.out, args.device,
                       args.reference_epochs, args.default_epochs, eval_n=args.eval_n)
    print(markdown(report))
    print(f"wrote {args.out}/bench.json and bench.md")
    return 0
