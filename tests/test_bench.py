"""The benchmark runs both schedules and reports them; speed itself is asserted by its output,
never by a timed test."""

import json

import pytest

import qrealign.bench as bench
from qrealign.models.tiny import tiny_model


def test_bench_reports_both_schedules(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: tiny_model("llama", num_hidden_layers=2))
    report = bench.run_bench("tiny", n=8, out=tmp_path, reference_epochs=6, default_epochs=1, heldout=4,
                             progress=False)
    ref, ours = report["schedules"]["reference"], report["schedules"]["default"]
    # reference: batch 1 and every prompt padded to 128 tokens -> steps = samples x epochs x layers
    assert ref["steps"] == 8 * 1 * 2 and ref["tokens"] == ref["steps"] * 128
    # default: batches of up to 8, split by label (6 malicious, 2 benign), length-bucketed
    assert ours["steps"] == 2 * 1 * 2 and ours["tokens"] < ref["tokens"]
    assert report["speedup"] > 0 and report["mm_peak_gflops"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["schedules"].keys() == {"reference", "default"}
    assert "| reference |" in (tmp_path / "bench.md").read_text()


def test_bench_evaluates_both_results_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: tiny_model("llama", num_hidden_layers=2))
    report = bench.run_bench("tiny", n=4, out=tmp_path, reference_epochs=6, default_epochs=1, heldout=2,
                             progress=False, eval_n=2, task_n=2)
    for schedule in report["schedules"].values():
        e = schedule["evaluation"]
        assert e["n"] == 2 and 0 <= e["harmful_score"] <= 100 and 0 <= e["over_refusal"] <= 100
        assert e["task_accuracy"] is not None
    assert "| task accuracy % |" in (tmp_path / "bench.md").read_text()


def test_bench_rejects_bad_counts_before_any_work(tmp_path):
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="eval_n"):
        bench.run_bench("tiny", n=4, out=tmp_path / "b", eval_n=-3, progress=False)
    assert not (tmp_path / "b").exists()
