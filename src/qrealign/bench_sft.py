"""`qrealign bench --sft-precision`: how fast the lab trains here in float32 and under bf16 autocast.

The lab's `amp="auto"` picks bf16 wherever the device reports native bf16 (oneDNN on a CPU,
`is_bf16_supported` on CUDA). "Native" is not "faster": a CPU with AVX512-BF16 but no AMX tiles
may run the small matmuls of a 135M model no faster in bf16 than in float32. This times the
alignment stage's own optimizer step (its LoRA, batch size and sequence length, on the `align`
split's harmful prompts with their refusals) under each precision, so a user can see what "auto"
chose and what it costs. The two precisions train different models (the stage key records it).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from .utils import resolve_device, write_report


def time_sft_steps(model_spec: str, amp: str | None, steps: int, warmup: int = 1, device=None) -> dict:
    """Seconds per optimizer step of the align stage's SFT under `amp` (None = float32), after
    `warmup` untimed steps (oneDNN builds its kernels on the first call)."""
    from .data.prompts import load_prompts
    from .data.responses import refusal_for
    from .finetune.config import AlignConfig
    from .finetune.sft import sft
    from .models import load_model

    model, tok = load_model(model_spec)
    pairs = [(p.text, refusal_for(p, 0)) for p in load_prompts("align", label=1)]
    config = replace(AlignConfig().sft, steps=warmup + steps, amp=amp)
    stamps: list[float] = []
    t0 = time.perf_counter()
    sft(model, tok, pairs, config, device=device, progress=False, on_step=lambda _s, _l: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in zip([t0] + stamps, stamps)][warmup:]
    return {"amp": amp or "float32", "steps": steps, "median_s": round(statistics.median(per_step), 3),
            "mean_s": round(statistics.fmean(per_step), 3)}


def run_sft_bench(model_spec: str = "smollm2-135m", steps: int = 4, device=None,
                  out: str | Path = "runs/bench-sft") -> dict:
    from .finetune.sft import native_bf16, resolve_amp
    from .utils import check_report_dir

    check_report_dir(out)
    dev = resolve_device(device)
    rows = [time_sft_steps(model_spec, None, steps, device=dev)]
    if native_bf16(dev):  # emulated bf16 is known to be far slower (57x on an AVX2 CPU): not timed
        rows.append(time_sft_steps(model_spec, "bfloat16", steps, device=dev))
    fastest = min(rows, key=lambda r: r["median_s"])
    report = {
        "machine": {"platform": platform.platform(), "device": str(dev), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(dev)},
        "model": model_spec, "rows": rows,
        "auto_picks": resolve_amp(dev, "auto") or "float32", "fastest": fastest["amp"],
    }
    write_report(out, "bench-sft", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Lab SFT step time ({m['device']}, {m['cpu_capability']}, {m['threads']} threads, "
             f"native bf16: {'yes' if m['native_bf16'] else 'no'})", "",
             f"{report['model']}, the align stage's optimizer step (LoRA, batch and length as in the demo).", "",
             "| precision | median s/step | mean s/step | steps timed |", "|---|---|---|---|"]
    lines += [f"| {r['amp']} | {r['median_s']} | {r['mean_s']} | {r['steps']} |" for r in report["rows"]]
    lines += ["", f"`amp=\"auto\"` picks **{report['auto_picks']}** here; the fastest measured is "
                  f"**{report['fastest']}**."]
    return "\n".join(lines) + "\n"
