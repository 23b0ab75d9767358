"""`qrealign bench --decode`: what `GenerationConfig.drop_finished` buys on a model, and whether
it changes the answers.

The same greedy generation twice in this process, on the dev (`probe`) prompts of both sides,
never the `eval` split: once with `generate`, whose batch steps every row until its longest answer
ends, once with stopped rows dropped from the batch and the KV cache. Reported: both times, how
many of the computed decode tokens were the rows' own, how many answers differ, and how many
of those the keyword judge reads differently (refused or not).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .utils import write_report


def run_decode_bench(model_spec: str = "smollm2-135m", n: int = 48, max_new_tokens: int = 64, batch_size: int = 48,
                     device=None, out: str | Path = "runs/bench-decode", log=print) -> dict:
    from .data.prompts import load_prompts
    from .evaluate.generate import GenerationConfig, generate
    from .evaluate.judges import KeywordJudge
    from .evaluate.runner import load_for_eval
    from .utils import check_report_dir

    check_report_dir(out)
    model, tok, _, _ = load_for_eval(model_spec, device=device)
    prompts = [p.text for side in (1, 0) for p in load_prompts("probe", label=side)[:n]]
    runs = {}
    for drop in (False, True):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, drop_finished=drop)
        t0 = time.time()
        answers = generate(model, tok, prompts, cfg, progress=False)
        runs[drop] = {"seconds": round(time.time() - t0, 1), "answers": answers}
        log(f"[bench] drop_finished={drop}: {runs[drop]['seconds']} s")
    refused = {drop: [v.refused for v in KeywordJudge().judge(prompts, runs[drop]["answers"])] for drop in runs}
    own, computed = _decode_tokens(tok, prompts, runs[False]["answers"], max_new_tokens, batch_size)
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "device": str(next(model.parameters()).device)},
        "workload": {"model": str(model_spec), "prompts": len(prompts), "split": "probe (dev)",
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "generate_s": runs[False]["seconds"], "drop_finished_s": runs[True]["seconds"],
        "speedup": round(runs[False]["seconds"] / max(runs[True]["seconds"], 1e-9), 2),
        "decode_tokens_own": own, "decode_tokens_computed": computed,
        "answers_differing": sum(a != b for a, b in zip(runs[False]["answers"], runs[True]["answers"])),
        "refusals_differing": sum(a != b for a, b in zip(refused[False], refused[True])),
    }
    write_report(out, "bench-decode", report, markdown(report))
    return report


def _decode_tokens(tok, prompts, answers, max_new_tokens: int, batch_size: int) -> tuple[int, int]:
    """(the answers' own tokens, the tokens `generate` computes), estimated: each answer's text is
    tokenised again (which can differ from the ids generated) plus one stop token; the batches are
    the prompts sorted by length (`length_batches`), each stepped until its longest answer ends."""
    from .evaluate.generate import length_batches

    lengths = [min(max_new_tokens, len(tok(a, add_special_tokens=False)["input_ids"]) + 1) for a in answers]
    batches = [[lengths[i] for i in idx] for idx in length_batches(prompts, batch_size)]
    return sum(lengths), sum(max(b) * len(b) for b in batches)


def markdown(report: dict) -> str:
    w = report["workload"]
    share = 100.0 * report["decode_tokens_own"] / max(report["decode_tokens_computed"], 1)
    return "\n".join([
        f"# Decode benchmark ({report['machine'].get('device', 'cpu')}; CPU {report['machine']['cpu_capability']}, "
        f"{report['machine']['threads']} threads)", "",
        f"{w['model']}: greedy answers to {w['prompts']} {w['split']} prompts, {w['max_new_tokens']} new tokens, "
        f"batch {w['batch_size']}.", "",
        "| decoding | seconds |", "|---|---|",
        f"| `generate` (every row until the batch's longest answer ends) | {report['generate_s']} |",
        f"| `drop_finished` (stopped rows leave the batch) | {report['drop_finished_s']} |", "",
        f"Speed-up **{report['speedup']}x**; the answers' own tokens are about {share:.0f} % of the decode tokens "
        f"`generate` computes (estimated from the answers' text); answers that differ: **{report['answers_differing']}** of {w['prompts']}, "
        f"of them judged refused in one and not the other: **{report['refusals_differing']}**.",
    ]) + "\n"
