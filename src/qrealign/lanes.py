"""Run independent pipeline stages side by side, one worker process per lane.

Why: on a CPU a small model's work does not fill two cores from one process (SmolLM2 on a
2-core machine: a second thread speeds a calibration or a generation up 1.5-1.8x, not 2x), while
two single-thread processes each keep about their single-thread speed. So the demo's independent
stages (the quantizations, the evaluations) finish sooner in two lanes of one thread than one
after another on two threads (`qrealign bench --lanes` measures it: 1.14x on a 2-core AVX2 CPU).
On a GPU, or with `workers=1`, jobs run in this process, in order.

A job names the jobs it needs (`after`); its arguments may hold `Ref(key)`, replaced by that
job's result when it starts. When a lane frees up, the ready job with the largest `cost` starts
(longest first keeps the lanes balanced). A worker's own output (progress bars included) goes
to `<log_dir>/<job>.log`; the lines a stage passes to `log` come back and are logged here, so
the caller sees the same "[stage] building / cached" lines either way.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .errors import QrealignError


@dataclass(frozen=True)
class Ref:
    """Stands for the result of job `key` in another job's arguments."""

    key: str


@dataclass
class Job:
    key: str
    fn: Callable  # a module-level function (workers import it); called as fn(*args, **kwargs, log=...)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()
    cost: float = 1.0  # relative, for ordering only


class JobFailed(QrealignError):
    pass


def run_jobs(jobs: list[Job], workers: int = 1, threads: int | None = None, log_dir: str | Path | None = None,
             log: Callable[[str], None] = print, desc: str = "stages",
             seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Run every job once its `after` jobs are done; return {key: result}. `seconds`, when
    given, receives each job's wall time."""
    _check(jobs)
    seconds = {} if seconds is None else seconds
    if workers <= 1:
        return _run_in_process(jobs, log, seconds)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    log_dir = Path(log_dir) if log_dir else None
    results: dict[str, Any] = {}
    pending = {j.key: j for j in jobs}
    running: dict[Future, tuple[Job, float]] = {}
    # The bar advances by each job's cost, so its ETA weighs a long calibration above a short one.
    bar = tqdm(total=sum(j.cost for j in jobs), desc=f"{desc} ({workers} lanes)",
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
    bar.set_postfix_str(f"0/{len(jobs)}")
    ctx = get_context("spawn")  # a fresh interpreter per lane: no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, os.getpid())) as pool:
        try:
            while pending or running:
                ready = sorted((j for j in pending.values() if all(k in results for k in j.after)),
                               key=lambda j: -j.cost)
                for job in ready[:workers - len(running)]:
                    del pending[job.key]
                    job_log = str(log_dir / f"{_slug(job.key)}.log") if log_dir else None
                    log(f"[lanes] start: {job.key}")
                    fut = pool.submit(_call, job.fn, _resolve(job.args, results), _resolve(job.kwargs, results),
                                      job_log)
                    running[fut] = (job, time.time())
                if not running:
                    raise JobFailed(f"jobs wait on each other or on missing jobs: {sorted(pending)}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job, t0 = running.pop(fut)
                    try:
                        result, lines = fut.result()
                    except Exception as exc:
                        where = f" (its output: {log_dir / (_slug(job.key) + '.log')})" if log_dir else ""
                        raise JobFailed(f"{job.key} failed: {type(exc).__name__}: {exc}{where}") from exc
                    for line in lines:
                        log(line)
                    seconds[job.key] = round(time.time() - t0, 1)
                    log(f"[lanes] done: {job.key} ({seconds[job.key]:.0f} s)")
                    results[job.key] = result
                    bar.update(min(job.cost, bar.total - bar.n))  # float sums may overshoot by an ulp
                    bar.set_postfix_str(f"{len(results)}/{len(jobs)}")
        except BaseException:
            # Stop the other lane now rather than after its job: every stage writes its output
            # atomically and calibrations resume from their block checkpoints.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise
        finally:
            bar.close()
    return results


def _check(jobs: list[Job]) -> None:
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise JobFailed(f"duplicate job keys: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    missing = sorted({k for j in jobs for k in j.after} - set(keys))
    if missing:
        raise JobFailed(f"jobs wait on jobs that do not exist: {missing}")


def _run_in_process(jobs: list[Job], log, seconds: dict[str, float]) -> dict[str, Any]:
    """In list order, each job as soon as what it needs is there."""
    results: dict[str, Any] = {}
    pending = list(jobs)
    while pending:
        job = next((j for j in pending if all(k in results for k in j.after)), None)
        if job is None:
            raise JobFailed(f"jobs wait on each other: {[j.key for j in pending]}")
        pending.remove(job)
        t0 = time.time()
        results[job.key] = job.fn(*_resolve(job.args, results), **_resolve(job.kwargs, results), log=log)
        seconds[job.key] = round(time.time() - t0, 1)
    return results


def _resolve(value, results: dict[str, Any]):
    if isinstance(value, Ref):
        return results[value.key]
    if isinstance(value, tuple):
        return tuple(_resolve(v, results) for v in value)
    if isinstance(value, list):
        return [_resolve(v, results) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, results) for k, v in value.items()}
    return value


def _slug(key: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", key.lower()).strip("-")


def _init_worker(threads: int, parent: int) -> None:
    # A lane must not outlive the run that started it: a killed parent (not Ctrl-C, which reaches
    # the whole process group) would leave it calibrating on its own for the rest of its job. The
    # parent's pid comes from the parent: the parent may be gone before this runs.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # bars go to a file: a line every 10 s, not every step


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _call(fn, args, kwargs, log_file: str | None):
    """In a worker: run one job with its output in `log_file`; return (result, log lines)."""
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    if log_file is None:
        return fn(*args, **kwargs, log=log), lines
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", buffering=1) as out:
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            return fn(*args, **kwargs, log=log), lines
        except BaseException:
            import traceback

            traceback.print_exc()  # into the job's log: the parent only gets the exception's message
            raise
        finally:
            sys.stdout, sys.stderr = saved
