"""The stage runner: dependencies, results passed on, the same answers in one lane or two, and a
failing job that names itself."""

import os

import pytest

from qrealign.lanes import Job, JobFailed, Ref, run_jobs


def add(a, b, log=print):
    log(f"[add] {a} + {b}")
    return a + b


def whoami(tag, log=print):
    import torch

    return tag, os.getpid(), torch.get_num_threads()


def boom(log=print):
    raise ValueError("no such prompt split")


def _jobs():
    return [
        Job("sum", add, (Ref("one"), Ref("two"))[::-1], after=("one", "two")),
        Job("one", add, (0, 1)),
        Job("two", add, (1, 1), cost=5.0),
        Job("nested", add, ([Ref("sum")], [Ref("one")]), after=("sum", "one")),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_run_after_what_they_need_and_get_its_result(workers, tmp_path):
    lines, seconds = [], {}
    results = run_jobs(_jobs(), workers=workers, threads=1, log_dir=tmp_path, log=lines.append, seconds=seconds)
    assert results == {"one": 1, "two": 2, "sum": 3, "nested": [3, 1]}
    assert set(seconds) == set(results) and all(s >= 0 for s in seconds.values())
    # the lines a job logs come back to the caller, whichever process ran it
    assert "[add] 2 + 1" in lines and "[add] 0 + 1" in lines
    if workers == 2:
        assert (tmp_path / "sum.log").read_text().strip() == "[add] 2 + 1"


def test_lanes_are_worker_processes_with_their_thread_count(tmp_path):
    jobs = [Job(f"w{i}", whoami, (i,)) for i in range(4)]
    results = run_jobs(jobs, workers=2, threads=1, log_dir=tmp_path, log=lambda line: None)
    pids = {pid for _, pid, _ in results.values()}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # the pool may start its second worker late
    assert all(threads == 1 for _, _, threads in results.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_stops_the_run_and_says_which(workers, tmp_path):
    jobs = [Job("ok", add, (1, 2)), Job("bad", boom, after=("ok",)), Job("later", add, (Ref("bad"), 1), after=("bad",))]
    with pytest.raises((JobFailed, ValueError), match="no such prompt split") as err:
        run_jobs(jobs, workers=workers, threads=1, log_dir=tmp_path, log=lambda line: None)
    if workers == 2:
        assert "bad failed: ValueError: no such prompt split" in str(err.value) and "bad.log" in str(err.value)
        log_text = (tmp_path / "bad.log").read_text()  # the worker's traceback, where the message points
        assert "Traceback" in log_text and "in boom" in log_text


def test_bad_job_graphs_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(JobFailed, match="duplicate job keys"):
        run_jobs([Job("a", add, (1, 1)), Job("a", add, (1, 2))])
    with pytest.raises(JobFailed, match="do not exist.*'ghost'"):
        run_jobs([Job("a", add, (1, 1), after=("ghost",))])
    with pytest.raises(JobFailed, match="wait on each other"):
        run_jobs([Job("a", add, (1, 1), after=("b",)), Job("b", add, (1, 1), after=("a",))])


def slow(seconds, log=print):
    import time

    time.sleep(seconds)
    return seconds


def test_a_failure_stops_the_other_lane_without_waiting_for_its_job(tmp_path):
    import time

    t0 = time.time()
    with pytest.raises(JobFailed, match="bad failed"):
        run_jobs([Job("slow", slow, (60,), cost=2.0), Job("bad", boom)], workers=2, threads=1, log_dir=tmp_path,
                 log=lambda line: None)
    assert time.time() - t0 < 45  # the 60 s job was stopped, not awaited


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_a_lane_exits_when_the_run_that_started_it_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # a parent process that starts one lane running a long job, then is killed with SIGKILL
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from qrealign.lanes import Job, run_jobs\n"
        "from test_lanes import slow\n"
        "run_jobs([Job('slow', slow, (120,))], workers=2, threads=1, log_dir=%r, log=print)\n"
    ) % (os.path.dirname(__file__), str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert "[lanes] start: slow" in parent.stdout.readline()
    time.sleep(3)  # let the worker start its job
    workers = _children(parent.pid)
    assert workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers)


def _children(pid):
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stage_revision_moves_only_its_own_kind(tmp_path, monkeypatch):
    from qrealign import stages

    inputs = {"parent": "abc", "config": {"steps": 3}}
    before = {kind: stages.stage_dir(kind, inputs, tmp_path) for kind in ("align", "quant-rtn-W8A8")}
    monkeypatch.setattr(stages, "STAGE_REVISIONS", {"quant": 1})
    after = {kind: stages.stage_dir(kind, inputs, tmp_path) for kind in before}
    assert after["align"] == before["align"]  # revision 0 stays out of the key: cached stages stay valid
    assert after["quant-rtn-W8A8"] != before["quant-rtn-W8A8"]
