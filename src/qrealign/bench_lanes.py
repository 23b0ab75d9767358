"""`qrealign bench --lanes`: what the demo's two lanes and the skipped initial-loss pass buy on
this machine, measured on the demo's own kinds of work.

Two workloads, each run twice (two calibrations, two generations, as the demo has several of
each): one after another in this process on every thread (`run_jobs(workers=1)`), then side by
side in two single-thread workers (`run_jobs(workers=2)`). Each job reports its own result digest,
so the table also says whether a lane changed the numbers (calibration parameters, generated
text). A third pair times one calibration with and without `CalibConfig.measure_init_loss`.
"""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path

import torch

from .lanes import Job, run_jobs
from .utils import params_digest, write_report


def calibrate_job(model_spec: str, n: int, scheme: str, measure_init_loss: bool = False, device: str | None = None,
                  log=print) -> dict:
    """One reconstruction calibration (the demo's reconstruction-only stage, on `n` prompts)."""
    from .calibrate.data import build_calibration
    from .calibrate.engine import CalibConfig, calibrate
    from .models import load_model

    model, tok = load_model(model_spec)
    calib = build_calibration("qrealign:calib", n=n, malicious_ratio=0.75)
    t0 = time.time()
    result = calibrate(model, tok, calib, scheme, CalibConfig(measure_init_loss=measure_init_loss),
                       device=device, progress=False)
    return {"seconds": round(time.time() - t0, 1), "digest": params_digest(result.params),
            "threads": torch.get_num_threads()}


def generate_job(model_spec: str, n: int, max_new_tokens: int, device: str | None = None, log=print) -> dict:
    """Greedy generation on the first `n` benign `probe` prompts (the evaluation's main cost)."""
    from .data.prompts import load_prompts
    from .evaluate.generate import GenerationConfig, generate
    from .models import load_model
    from .utils import resolve_device

    model, tok = load_model(model_spec, device=resolve_device(device))
    prompts = [p.text for p in load_prompts("probe", label=0)[:n]]
    t0 = time.time()
    out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=48),
                   progress=False)
    digest = hashlib.sha256("\x00".join(out).encode()).hexdigest()[:16]
    return {"seconds": round(time.time() - t0, 1), "digest": digest, "threads": torch.get_num_threads()}


def run_lanes_bench(model_spec: str = "smollm2-135m", n_calib: int = 32, n_gen: int = 48, max_new_tokens: int = 32,
                    scheme: str = "W8A8", out: str | Path = "runs/bench-lanes", device: str | None = None,
                    log=print) -> dict:
    from .quant.scheme import get_scheme
    from .utils import check_report_dir, resolve_device

    get_scheme(scheme)  # a typo fails before four model loads
    check_report_dir(out)
    device = str(resolve_device(device))
    jobs = [Job(f"calibrate {i}", calibrate_job, (model_spec, n_calib, scheme, False, device), cost=2.0)
            for i in range(2)]
    jobs += [Job(f"generate {i}", generate_job, (model_spec, n_gen, max_new_tokens, device)) for i in range(2)]
    rows = {}
    for workers in (1, 2):
        t0 = time.time()
        results = run_jobs(jobs, workers=workers, threads=1, log=log, desc="bench")  # threads: per lane
        rows[workers] = {"wall_s": round(time.time() - t0, 1), "jobs": results}
    one, two = rows[1], rows[2]
    init = {flag: calibrate_job(model_spec, n_calib, scheme, measure_init_loss=flag, device=device)
            for flag in (False, True)}
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device},
        "workload": {"model": model_spec, "scheme": scheme, "calibration_prompts": n_calib,
                     "generation_prompts": n_gen, "max_new_tokens": max_new_tokens},
        "one_lane": one, "two_lanes": two,
        "speedup": round(one["wall_s"] / two["wall_s"], 2),
        "identical": {key: one["jobs"][key]["digest"] == two["jobs"][key]["digest"] for key in one["jobs"]},
        "init_loss": {"off_s": init[False]["seconds"], "on_s": init[True]["seconds"],
                      "identical": init[False]["digest"] == init[True]["digest"]},
    }
    write_report(out, "bench-lanes", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    w = report["workload"]
    m = report["machine"]
    lines = [f"# Lanes benchmark ({m.get('device', 'cpu')}; CPU {m['cpu_capability']}, {m['threads']} threads)", "",
             f"{w['model']}: two {w['scheme']} reconstruction calibrations ({w['calibration_prompts']} prompts) and two "
             f"greedy generations ({w['generation_prompts']} prompts, {w['max_new_tokens']} tokens).", "",
             "| job | one lane, all threads (s) | two lanes, one thread each (s) | same result |",
             "|---|---|---|---|"]
    for key, a in report["one_lane"]["jobs"].items():
        b = report["two_lanes"]["jobs"][key]
        lines.append(f"| {key} | {a['seconds']} | {b['seconds']} | {'yes' if report['identical'][key] else 'no'} |")
    lines.append(f"| **wall time** | **{report['one_lane']['wall_s']}** | **{report['two_lanes']['wall_s']}** | |")
    i = report["init_loss"]
    lines += ["", f"Speed-up of two lanes: **{report['speedup']}x**.", "",
              f"One calibration without / with the initial-loss pass: {i['off_s']} s / {i['on_s']} s "
              f"(same parameters: {'yes' if i['identical'] else 'no'})."]
    return "\n".join(lines) + "\n"
