"""`qrealign demo`: the whole pipeline on the embedded model, cached stage by stage."""

from __future__ import annotations

COMMAND = "demo"
ORDER = 0
HELP = "end-to-end demo: align -> attack -> probes -> RTN / reconstruction / Q-realign -> report"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder, stages cached inside (default: runs/demo)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default="W8A8,W4A8", help="comma-separated; the first gets every variant")
    parser.add_argument("--poison-ratio", type=float, default=None, help="attack poison ratio (default: the attack's)")
    parser.add_argument("--attack-sweep", default="",
                        help="comma-separated extra poison ratios evaluated as attacked-FP rows (e.g. 0,0.05,0.2)")
    parser.add_argument("--extended", action="store_true",
                        help="also the contrast-probe Q-realign row and the raw (never aligned) model's row")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-limit", type=int, default=None, help="first N prompts per side (default: whole eval split)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--lanes", type=int, default=None,
                        help="worker processes for the stages after the probes (default: 2 on a CPU with 2+ cores, "
                             "1 on a GPU); each lane's output goes to OUT/logs/")
    parser.add_argument("--compile-quantizer", action="store_true",
                        help="also calibrate the reconstruction-only and paper-probe rows with the fake-quantizers "
                             "under torch.compile, as the first-token rows always are (~1.5x per block on SmolLM2; "
                             "other float rounding, so their own cached stages and numbers)")
    parser.add_argument("--drop-finished", action="store_true",
                        help="evaluations take a stopped answer out of its batch (greedy decoding computes only "
                             "the rows still answering; other float rounding, so their own cached evaluations)")
    parser.add_argument("--rebuild-changed", action="store_true",
                        help="rebuild cached stages not known to be built by this code (the code that decides a "
                             "stage's numbers changed since, or the stage predates the record); without it they are "
                             "reused and listed under the report's Stages")
    parser.add_argument("--also-eval", action="append", default=[], metavar="SET",
                        help="also evaluate every row on this held-out prompt set (harmful and benign prompts: "
                             "qrealign:confirm, the second bundled held-out set, or a file); its own table and "
                             "verdict go to OUT/report/NAME/ (repeatable; about 3.5 min per row per set on 2 cores)")
    parser.add_argument("--export", nargs="?", const="bfloat16", default=None, metavar="DTYPE",
                        choices=["bfloat16", "float16", "float32"],
                        help="also write each Q-realign row at W8A8 (or W4A16) as a compressed-tensors checkpoint "
                             "(embeddings, norms and scales in DTYPE, default bfloat16) and evaluate that checkpoint "
                             "as its own row, with the answers it shares with the row it came from")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the lab and the calibrations (default: 0)")


def run(args) -> int:
    from ..demo import DEFAULT_VARIANTS, EXTENDED_VARIANTS, DemoConfig, run_demo
    from ._lists import floats, split_list

    sweep = floats(args.attack_sweep, "--attack-sweep")
    cfg = DemoConfig(out=args.out, model=args.model, schemes=tuple(split_list(args.schemes)),
                     poison_ratio=args.poison_ratio, raw_row=args.extended,
                     variants=EXTENDED_VARIANTS if args.extended else DEFAULT_VARIANTS,
                     attack_sweep=sweep, epochs=args.epochs, max_new_tokens=args.max_new_tokens,
                     eval_limit=args.eval_limit, device=args.device, seed=args.seed,
                     lanes=args.lanes, compile_quantizer=args.compile_quantizer,
                     drop_finished=args.drop_finished, rebuild_changed=args.rebuild_changed,
                     also_eval=tuple(args.also_eval), export_dtype=args.export)
    report = run_demo(cfg)
    md = report / "report.md"
    if md.is_file():
        print(md.read_text())
    return 0
