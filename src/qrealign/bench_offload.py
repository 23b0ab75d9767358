"""`qrealign bench --offload DIR`: what disk offload saves and costs on a local checkpoint.

Each job runs in a fresh process (so its peak resident memory is its own), on one thread, once
with the model in memory and once with `offload="disk"`: an RTN and an OmniQuant (LWC + LET)
calibration on `n` prompts, and a probe-state capture of the `probe` split's first `n` prompts per
side. Reported per job: wall time of the work (load excluded), the process's peak RSS, and a digest
of the result (learned parameters, captured states), so the table also says whether offload changed
the numbers (it should not: the two paths are bit-identical by design and by test).
"""

from __future__ import annotations

import multiprocessing
import platform
import queue as queue_mod
import time
from pathlib import Path

import torch

from .utils import params_digest, write_report

KINDS = ("calibrate-rtn", "calibrate-omniquant", "probe-capture")


def _job(kind: str, model_dir: str, offload: str | None, n: int, scheme: str, device: str, queue) -> None:
    import resource

    try:
        torch.set_num_threads(1)
        from .models import load_model

        # calibration keeps the model on CPU and onloads blocks to `device`; capture runs where it is loaded
        model, tok = load_model(model_dir, offload=offload, device=device if kind == "probe-capture" else "cpu")
        t0 = time.time()
        if kind == "probe-capture":
            from .data.prompts import load_prompts
            from .probes.capture import capture_last_token_states

            prompts = [p.text for label in (1, 0) for p in load_prompts("probe", label=label)[:n]]
            digest = params_digest({"states": capture_last_token_states(model, tok, prompts, progress=False)})
        else:
            from .calibrate.data import build_calibration
            from .calibrate.engine import CalibConfig, calibrate

            calib = build_calibration("qrealign:calib", n=n, malicious_ratio=0.75)
            method = kind.split("-", 1)[1]
            result = calibrate(model, tok, calib, scheme, CalibConfig(method=method, epochs=1, batch_size=4),
                               device=device, progress=False)
            digest = params_digest(result.params)
        seconds = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        queue.put({"seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3), "digest": digest})
    except Exception as exc:  # reported in the table, not lost in a child's traceback
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _run_in_fresh_process(*args, target=None) -> dict:
    """`target(*args, queue)` (default `_job`) in a spawned process; its one result, or an error row."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target or _job, args=(*args, queue))
    proc.start()
    try:
        # A child killed from outside (the kernel's OOM killer, which this benchmark walks towards)
        # never puts a result: poll instead of blocking on the queue forever.
        while True:
            alive = proc.is_alive()  # read before the wait: a result put just before exit is still read
            try:
                result = queue.get(timeout=0.5)
                break
            except queue_mod.Empty:
                if not alive:
                    result = {"error": f"the job's process died without a result (exit code {proc.exitcode}; "
                                       "killed for memory?)"}
                    break
    except BaseException:  # Ctrl-C / SIGTERM: the child goes too, not joined at exit after its calibration
        proc.terminate()
        proc.join()
        raise
    proc.join()
    return result


def run_offload_bench(model_dir: str, n: int = 8, scheme: str = "W8A8", kinds: tuple[str, ...] = KINDS,
                      out: str | Path = "runs/bench-offload", device: str | None = None, log=print) -> dict:
    from .errors import QrealignError
    from .quant.scheme import get_scheme
    from .utils import check_report_dir, resolve_device

    get_scheme(scheme)  # a typo fails here, not as an error row in every job
    check_report_dir(out)
    device = str(resolve_device(device))

    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise QrealignError(f"unknown offload bench jobs {unknown}; choose from {list(KINDS)}")
    if not (Path(model_dir) / "config.json").is_file():
        raise QrealignError(f"{model_dir} is not a local model directory (offload reads safetensors files)")
    rows = {}
    for kind in kinds:
        rows[kind] = {}
        for offload in (None, "disk"):
            mode = "disk" if offload else "memory"
            rows[kind][mode] = _run_in_fresh_process(kind, str(model_dir), offload, n, scheme, device)
            log(f"[bench offload] {kind} {mode}: {rows[kind][mode]}")
        pair = rows[kind]
        rows[kind]["identical"] = pair["memory"].get("digest") is not None and \
            pair["memory"].get("digest") == pair["disk"].get("digest")
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    report = {"model": str(model_dir), "checkpoint_gib": round(size / 2**30, 3), "n": n, "scheme": scheme,
              "threads": 1, "device": device, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jobs": rows}
    write_report(out, "bench-offload", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Disk offload: {report['model']} ({report['checkpoint_gib']} GiB of safetensors)", "",
             f"{report['date']}, {report['machine']}, one thread, device {report.get('device', 'cpu')}, "
             f"n = {report['n']}, {report['scheme']}.", "",
             "| job | memory: s | memory: peak RSS GiB | disk: s | disk: peak RSS GiB | same result |",
             "|---|---|---|---|---|---|"]
    for kind, row in report["jobs"].items():
        m, d = row["memory"], row["disk"]
        if "error" in m or "error" in d:
            lines.append(f"| {kind} | {m.get('error', m.get('seconds'))} | | {d.get('error', d.get('seconds'))} | | |")
            continue
        lines.append(f"| {kind} | {m['seconds']} | {m['peak_rss_gib']} | {d['seconds']} | {d['peak_rss_gib']} | "
                     f"{'yes' if row['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"
