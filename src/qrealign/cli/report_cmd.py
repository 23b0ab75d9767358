"""`qrealign report RESULT_DIR... --out DIR`: the comparison table and plots over several evals."""

from __future__ import annotations

COMMAND = "report"
ORDER = 31
HELP = "compare several `qrealign eval` outputs: Markdown/HTML table and plots"


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="eval output directories (or result.json files), in row order")
    parser.add_argument("--names", help="comma-separated row names (default: each result's own name)")
    parser.add_argument("--title", default="qrealign evaluation report")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")


def run(args) -> int:
    from ..evaluate.runner import EvalResult
    from ..report import check_report_out, markdown_table, write_report
    from ..report.write import distinct_names
    from ..utils import atomic_dir
    from ._lists import one_per

    check_report_out(args.out)  # before reading anything: an eval's directory is not a report's
    results = [EvalResult.load(p) for p in args.results]
    if args.names:
        for r, n in zip(results, one_per(args.names, results, "--names", [])):
            r.name = n
    with atomic_dir(args.out) as tmp:
        write_report(results, tmp, title=args.title)
    print(markdown_table(distinct_names(results)))  # the rows as the report names them
    print(f"wrote {args.out}/report.md, report.html, plots/")
    return 0
