"""Output directories: a command replaces its `--out` wholesale, so it must refuse a directory
that is not an earlier output of the same command — before doing the work, leaving it intact."""
import json

import pytest
import torch

from qrealign.calibrate.artifact import save_quantized
from qrealign.data.types import Prompt
from qrealign.errors import QrealignError
from qrealign.evaluate.generate import GenerationConfig
from qrealign.evaluate.runner import evaluate_model
from qrealign.models.tiny import tiny_model
from qrealign.utils import atomic_dir, check_out_dir


def _foreign(tmp_path):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "notes.txt").write_text("not qrealign's")
    return d


def test_check_out_dir_accepts_new_empty_and_own_outputs(tmp_path):
    check_out_dir(tmp_path / "missing", "result.json")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", "result.json")
    own = tmp_path / "own"
    own.mkdir()
    (own / "result.json").write_text("{}")
    check_out_dir(own, "result.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "qrealign.json").write_text(json.dumps({"kind": "quantized"}))
    check_out_dir(run, "qrealign.json", kind="quantized")


def test_check_out_dir_refuses_foreign_file_and_other_kind(tmp_path):
    with pytest.raises(QrealignError, match="not an earlier output"):
        check_out_dir(_foreign(tmp_path), "result.json")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(QrealignError, match="not a directory"):
        check_out_dir(f, "result.json")
    model_dir = tmp_path / "aligned"
    model_dir.mkdir()
    (model_dir / "qrealign.json").write_text(json.dumps({"kind": "finetuned"}))
    with pytest.raises(QrealignError, match="kind 'quantized'"):
        check_out_dir(model_dir, "qrealign.json", kind="quantized")
    (model_dir / "qrealign.json").write_text("not json")
    with pytest.raises(QrealignError, match="not an earlier output"):
        check_out_dir(model_dir, "qrealign.json", kind="quantized")


def test_atomic_dir_with_marker_leaves_foreign_dir_and_no_temp(tmp_path):
    d = _foreign(tmp_path)
    with pytest.raises(QrealignError):
        with atomic_dir(d, marker="result.json"):
            raise AssertionError("the block must not run")
    assert (d / "notes.txt").read_text() == "not qrealign's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    own = tmp_path / "own"
    with atomic_dir(own, marker="result.json") as tmp:
        (tmp / "result.json").write_text("1")
    with atomic_dir(own, marker="result.json") as tmp:  # an earlier output is replaced
        (tmp / "result.json").write_text("2")
    assert (own / "result.json").read_text() == "2"


def test_the_working_directory_or_above_is_no_out(tmp_path, monkeypatch):
    """An output replaces its folder by a rename: `--out .` used to crash after the work (and leave a
    hidden `..old-*` folder); the working directory and its parents are refused up front."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), str(tmp_path), "./"):
        with pytest.raises(QrealignError, match="working directory"):
            check_out_dir(out, "result.json")
    check_out_dir("sub", "result.json")  # a sub-directory is fine


def test_atomic_dir_puts_the_earlier_output_back_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    import qrealign.utils as utils

    own = tmp_path / "own"
    with atomic_dir(own, marker="result.json") as tmp:
        (tmp / "result.json").write_text("1")
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new output into place
            raise OSError("disk trouble")
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_dir(own, marker="result.json") as tmp:
            (tmp / "result.json").write_text("2")
    monkeypatch.setattr(utils.os, "replace", real_replace)
    assert (own / "result.json").read_text() == "1"  # the earlier output, where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]  # no temporary or old folder left


def test_a_user_text_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    from qrealign.cli import main
    from qrealign.utils import read_user_text

    binary = tmp_path / "table.md"
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(QrealignError, match="--card-table .* not a UTF-8 text file"):
        read_user_text(binary, "--card-table")
    with pytest.raises(QrealignError, match="cannot read --ppl-text .*missing"):
        read_user_text(tmp_path / "missing", "--ppl-text")
    assert main(["export", str(tmp_path / "norun"), "--card-table", str(binary), "--out", str(tmp_path / "x")]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_save_quantized_refuses_a_model_directory(tmp_path):
    model_dir = tmp_path / "aligned"
    model_dir.mkdir()
    (model_dir / "qrealign.json").write_text(json.dumps({"kind": "finetuned"}))
    (model_dir / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(QrealignError, match="kind 'quantized'"):
        save_quantized(model_dir, {"w": torch.zeros(2)}, {"source": "x"})
    assert (model_dir / "model.safetensors").read_bytes() == b"weights"
    run = save_quantized(tmp_path / "run", {"w": torch.zeros(2)}, {"source": "x"})
    save_quantized(run, {"w": torch.ones(2)}, {"source": "x"})  # its own earlier output: replaced


def test_evaluate_refuses_foreign_out_before_generating(tmp_path, monkeypatch):
    model, tok = tiny_model("llama")
    d = _foreign(tmp_path)

    def no_generation(*a, **k):
        raise AssertionError("generation ran before the --out check")

    monkeypatch.setattr("qrealign.evaluate.runner.generate", no_generation, raising=False)
    harmful = [Prompt(id="h0", text="a harmful request", label=1, category="test", split="custom")]
    with pytest.raises(QrealignError, match="not an earlier output"):
        evaluate_model(model, tok, harmful=harmful, benign=None, gen=GenerationConfig(max_new_tokens=2),
                       out_dir=d, progress=False)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]


def test_an_output_of_another_command_of_the_same_kind_is_refused(tmp_path, capsys):
    """quantize and realign both write "quantized" runs, align and attack both "finetuned" models:
    the kind alone let `quantize --out <a realign run>` and `align --out <the attacked model>`
    replace them (the attacked model's fingerprint is what every later run points at)."""
    from qrealign.cli import main
    from qrealign.finetune.config import AlignConfig
    from qrealign.finetune.stage import finetune_stage

    realigned = tmp_path / "realigned"
    realigned.mkdir()
    (realigned / "qrealign.json").write_text(json.dumps({"kind": "quantized", "method": "qrealign"}))
    (realigned / "quant_params.safetensors").write_bytes(b"learned")
    assert main(["quantize", str(tmp_path / "no-model"), "--method", "rtn", "--out", str(realigned)]) == 2
    assert "another command" in capsys.readouterr().err
    assert (realigned / "quant_params.safetensors").read_bytes() == b"learned"
    check_out_dir(realigned, "qrealign.json", kind="quantized", same={"method": ("qrealign",)})  # realign may
    attacked = tmp_path / "attacked"
    attacked.mkdir()
    (attacked / "qrealign.json").write_text(json.dumps({"kind": "finetuned", "stage": "attack"}))
    with pytest.raises(QrealignError, match="another command .*stage 'attack'"):
        finetune_stage("align", str(tmp_path / "no-model"), AlignConfig(), out=attacked)
    # a benchmark never writes into a model or a qrealign output
    from qrealign.utils import write_report

    with pytest.raises(QrealignError, match="benchmark directory"):
        write_report(attacked, "bench", {}, "")
    assert sorted(p.name for p in attacked.iterdir()) == ["qrealign.json"]


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_out_that_cannot_be_written_fails_before_any_work(tmp_path, capsys, where):
    """`--out file/x` or `--out /proc/x` used to fail after the work (generation, capture, fit)
    with a raw FileExistsError or FileNotFoundError."""
    from qrealign.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "sub" if where == "under-a-file" else "/proc/qrealign-out"
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m = str(tmp_path / "m")
    for cmd in (["eval", m, "--limit", "1"], ["probe", m, "--limit", "2"], ["quantize", m, "--method", "rtn"]):
        assert main([*cmd, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert ("is not a directory" in err or "cannot write in" in err) and "Traceback" not in err


def test_tensor_files_get_a_normal_files_mode(tmp_path):
    """safetensors creates its files 0600: a run, probes or export shard another user or a serving
    container must read gets the JSON files' mode (umask applied)."""
    import os
    import stat

    from qrealign.utils import save_tensors

    save_tensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o666 & ~mask
    run = save_quantized(tmp_path / "run", {"p": torch.zeros(1)}, {"source": None})
    assert stat.S_IMODE((run / "quant_params.safetensors").stat().st_mode) == 0o666 & ~mask


def test_an_export_is_not_quantized_again(tmp_path, capsys):
    """An export holds integer weights; quantize/realign over it would quantize twice."""
    from qrealign.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "qrealign.json").write_text(json.dumps({"kind": "export"}))
    assert main(["quantize", str(export), "--method", "rtn", "--out", str(tmp_path / "run")]) == 2
    assert "quantize twice" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_atomic_dir_removes_what_dead_processes_of_this_host_left(tmp_path):
    """A SIGKILL, the OOM killer or a terminated demo lane skips atomic_dir's cleanup; the next
    write of the same output removes those leftovers, and only those."""
    import subprocess
    import sys

    from qrealign.utils import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    import os

    leftovers = {
        f".out.tmp-{_host()}-{dead}-abc123": False,  # a dead process of this host: removed
        f".out.old-{_host()}-{dead}-def456": False,
        f".out.tmp-{_host()}-{os.getpid()}-running": True,  # a live process: kept
        f".out.tmp-otherhost-{dead}-xyz": True,  # another host (shared filesystem): kept
        f".outer.tmp-{_host()}-{dead}-zzz": True,  # another output's: kept
    }
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.bin").write_bytes(b"x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    for name, kept in leftovers.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / "out" / "done.txt").is_file()


def test_a_folder_sweep_removes_every_dead_build_of_this_host_whatever_its_output(tmp_path):
    """Review 68: leftovers were removed only when the same output was written again; the demo now
    sweeps its stages folder at start, so a half-built stage under an old key does not stay."""
    import os
    import subprocess
    import sys

    from qrealign.utils import _host, remove_orphans_under

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftovers = {
        f".quant-x-W8A8-1234.tmp-{_host()}-{dead}-abc": False,  # any output's, dead: removed
        f".eval-y.old-{_host()}-{dead}-def": False,
        f".quant-x-W8A8-1234.tmp-{_host()}-{os.getpid()}-live": True,  # a running process's: kept
        f".quant-z.tmp-otherhost-{dead}-xyz": True,  # another host's: kept
        ".checkpoint-quant-x-W8A8-1234": True,  # a resumable checkpoint is not a leftover
        "quant-x-W8A8-1234": True,  # a finished stage
    }
    for name in leftovers:
        (tmp_path / name).mkdir()
    removed = remove_orphans_under(tmp_path)
    assert sorted(removed) == sorted(n for n, kept in leftovers.items() if not kept)
    for name, kept in leftovers.items():
        assert (tmp_path / name).exists() == kept, name
    assert remove_orphans_under(tmp_path / "absent") == []


def test_sigterm_ends_a_cli_run_like_ctrl_c_and_it_resumes(tmp_path, capsys):
    """`kill`, SLURM's time limit or Kubernetes send SIGTERM: the run stops with the interrupt
    message, leaves no half-written output, keeps its block checkpoint, and the same command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from qrealign.models.tiny import tiny_model

    model, tok = tiny_model("llama", seed=0, num_hidden_layers=6)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"prompt number {i} about topic {i % 5}", "label": i % 2}) + "\n"
                             for i in range(16)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qrealign", "quantize", str(tmp_path / "model"), "--out", str(out), "--calib",
           str(calib), "--method", "omniquant", "--epochs", "8", "--batch-size", "4", "--scheme", "W4A8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = tmp_path / ".run.checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before the first checkpoint: make the run longer"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))
    assert state.is_file()
    from qrealign.cli import main

    assert main(cmd[3:]) == 0  # the same command again, in this process (a second interpreter costs seconds)
    assert "resuming from" in capsys.readouterr().err
    assert (out / "qrealign.json").is_file() and not (tmp_path / ".run.checkpoint").exists()
