"""The record of which code built a cached stage (`stage_code`, `stages.cached_stage`)."""

import json

import pytest

from qrealign import stage_code, stages
from qrealign.stage_code import STAGE_ENTRIES, changed_modules, code_digest, kind_sources, source_hash


def test_source_hash_reads_code_not_text():
    base = 'def f(x):\n    """Why."""\n    return x * 2  # doubled\n'
    same = [
        "def f(x):\n    return x * 2\n",  # no docstring, no comment
        'def f(x):\n    """Another why."""\n    return (x\n            * 2)\n',  # other docstring, re-wrapped
        '# a header comment\n\ndef f(x):\n    """Why."""\n    return x * 2\n',
    ]
    other = ["def f(x):\n    return 2 * x\n", "def f(x):\n    return x * 2.0\n", "def f(y):\n    return y * 2\n"]
    assert all(source_hash(s) == source_hash(base) for s in same)
    assert len({source_hash(s) for s in other} | {source_hash(base)}) == 4


def test_a_kind_digests_the_modules_its_entries_import_and_no_workflow_module():
    for kind, entries in STAGE_ENTRIES.items():
        sources = kind_sources(kind)
        assert set(entries) <= set(sources), kind
        assert not [m for m in sources if m.startswith(stage_code.WORKFLOW)], kind
    quant = kind_sources("quant")
    # imported at the top (engine), inside a function (the artifact loader) and through a package
    for module in ("calibrate/engine.py", "quant/quantizer.py", "quant/let.py", "calibrate/train.py",
                   "models/registry.py"):
        assert module in quant
    assert "finetune/sft.py" in kind_sources("align") and "finetune/sft.py" not in kind_sources("eval")
    assert "evaluate/generate.py" in kind_sources("eval")
    # an unknown kind takes every module that is not workflow
    assert "finetune/sft.py" in kind_sources("mystery") and "demo.py" not in kind_sources("mystery")


def test_changed_modules_names_edited_added_and_removed_ones():
    current = code_digest("probes")
    old = json.loads(json.dumps(current))
    assert changed_modules(old, current) == []
    old["files"]["probes/fit.py"] = "0" * 12
    old["files"]["gone.py"] = "1" * 12
    del old["files"]["utils.py"]
    assert changed_modules(old, current) == ["gone.py", "probes/fit.py", "utils.py"]


def _builder(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "out.txt").write_text("built")
    return build


def test_a_stage_records_its_code_and_a_changed_one_is_named_or_rebuilt(tmp_path):
    calls, logs = [], []
    path = stages.cached_stage("quant-x-W8A8", {"a": 1}, tmp_path, _builder(calls), log=logs.append)
    record = json.loads((path / stages.PROVENANCE_FILE).read_text())
    assert record["kind"] == "quant" and record["code"] == code_digest("quant")["digest"]
    assert set(record["modules"]) == set(kind_sources("quant")) and record["torch"]
    assert stages.stage_code_change(path) is None
    assert stages.stage_code_lines([path]) == ["- All 1 stages were built by this code (the modules that decide "
                                               "their numbers)."]

    record["code"], record["modules"]["calibrate/engine.py"] = "f" * 16, "f" * 12
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    why = stages.stage_code_change(path)
    assert why.startswith("built by other code: calibrate/engine.py changed since")
    logs.clear()
    assert stages.cached_stage("quant-x-W8A8", {"a": 1}, tmp_path, _builder(calls), log=logs.append) == path
    assert len(calls) == 1 and logs == [f"[quant-x-W8A8] cached: {path} ({why})"]
    lines = stages.stage_code_lines([path, path])  # a stage named twice counts once
    assert lines[0].startswith("- **1 of 1 stages are not known to be built by this code**")
    assert lines[1] == f"  - `{path.name}`: {why}"

    stages.cached_stage("quant-x-W8A8", {"a": 1}, tmp_path, _builder(calls), log=logs.append, rebuild_changed=True)
    assert len(calls) == 2 and stages.stage_code_change(path) is None


def test_a_stage_from_before_the_record_is_reused_but_not_vouched_for(tmp_path):
    calls = []
    path = stages.stage_dir("eval-old", {"a": 1}, tmp_path)
    path.mkdir(parents=True)
    assert "built before stages recorded their code" in stages.stage_code_change(path)
    assert stages.cached_stage("eval-old", {"a": 1}, tmp_path, _builder(calls), log=None) == path and not calls
    stages.cached_stage("eval-old", {"a": 1}, tmp_path, _builder(calls), log=None, rebuild_changed=True)
    assert len(calls) == 1 and (path / stages.PROVENANCE_FILE).is_file()


def test_a_failed_rebuild_keeps_the_old_stage(tmp_path):
    calls = []
    path = stages.cached_stage("probes-x", {"a": 1}, tmp_path, _builder(calls), log=None)
    (path / stages.PROVENANCE_FILE).unlink()

    def fail(tmp):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        stages.cached_stage("probes-x", {"a": 1}, tmp_path, fail, log=None, rebuild_changed=True)
    assert (path / "out.txt").read_text() == "built"


def test_the_demo_cli_passes_rebuild_changed_on(tmp_path, monkeypatch):
    from qrealign import demo
    from qrealign.cli import main

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        return tmp_path  # no report.md there: the command prints nothing more

    monkeypatch.setattr(demo, "run_demo", fake_run)
    assert main(["demo", "--out", str(tmp_path / "d"), "--rebuild-changed"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert [cfg.rebuild_changed for cfg in seen] == [True, False]
