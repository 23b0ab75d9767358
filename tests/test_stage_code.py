"""The record of which code built a cached stage (`stage_code`, `stages.cached_stage`)."""

import json
import platform

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
    # a teacher pass reads the checkpoint folder's layout, not the block trainer: editing the engine
    # must not flag every cached teacher pass as built by other code
    targets = kind_sources("targets")
    assert "calibrate/checkpoints.py" in targets and "calibrate/behaviour.py" in targets
    assert not {"calibrate/engine.py", "calibrate/train.py"} & set(targets)
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
    assert stages.stage_code_lines(stages.stage_code_changes([path])) == ["- All 1 stages were built by this code (the modules that decide "
                                               "their numbers)."]

    record["code"], record["modules"]["calibrate/engine.py"] = "f" * 16, "f" * 12
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    why = stages.stage_code_change(path)
    assert why.startswith("built by other code: calibrate/engine.py changed since") and "Python" not in why
    record["python"] = "3.0.0"  # the digest reads code through ast.unparse, which may change with Python
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    assert stages.stage_code_change(path).endswith(f"(or only Python: it was 3.0.0, now {platform.python_version()})")
    record["python"] = platform.python_version()
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    code_ok = {**record, "code": code_digest("quant")["digest"], "modules": code_digest("quant")["files"]}
    (path / stages.PROVENANCE_FILE).write_text(json.dumps({**code_ok, "torch": "1.0.0"}))
    import torch

    assert stages.stage_code_change(path) == f"built under other libraries: torch 1.0.0 -> {torch.__version__}"
    del code_ok["transformers"]  # a record without a library's version is not compared on it
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(code_ok))
    assert stages.stage_code_change(path) is None
    (path / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    logs.clear()
    assert stages.cached_stage("quant-x-W8A8", {"a": 1}, tmp_path, _builder(calls), log=logs.append) == path
    assert len(calls) == 1 and logs == [f"[quant-x-W8A8] cached: {path} ({why})"]
    lines = stages.stage_code_lines(stages.stage_code_changes([path, path]))  # a stage named twice counts once
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


def test_a_module_named_in_a_string_for_importlib_counts():
    # finetune/attack.py loads its task class from "qrealign.data.topic_task:TopicCodeTask"
    assert "data/topic_task.py" in kind_sources("attack")


def test_a_rebuilt_or_changed_upstream_stage_unsettles_what_was_built_from_it(tmp_path):
    calls, root = [], tmp_path / "stages"
    up = stages.cached_stage("attack", {"a": 1}, root, _builder(calls), log=None)
    down = stages.cached_stage("eval-x", {"b": 1}, root, _builder(calls), log=None, upstream=(up, None))
    outside = tmp_path / "a-model"  # not in the stages folder: not recorded, not checked
    outside.mkdir()
    other = stages.cached_stage("eval-y", {"b": 2}, root, _builder(calls), log=None, upstream=(outside,))
    assert json.loads((down / stages.PROVENANCE_FILE).read_text())["upstream"] == {up.name: _build(up)}
    assert json.loads((other / stages.PROVENANCE_FILE).read_text())["upstream"] == {}
    assert stages.stage_code_change(down) is None

    stages.cached_stage("attack", {"a": 1}, root, _builder(calls), log=None, force=True)
    assert stages.stage_code_change(up) is None
    assert stages.stage_code_change(down) == f"its upstream stage {up.name} was rebuilt after it"
    stages.cached_stage("eval-x", {"b": 1}, root, _builder(calls), log=None, upstream=(up,),
                        rebuild_changed=True)
    assert len(calls) == 5 and stages.stage_code_change(down) is None

    record = json.loads((up / stages.PROVENANCE_FILE).read_text())
    record["code"] = "0" * 16  # the upstream stage is now one built by other code
    (up / stages.PROVENANCE_FILE).write_text(json.dumps(record))
    assert stages.stage_code_change(down) == f"its upstream stage {up.name} is not known to match today's code"


def _build(path):
    return json.loads((path / stages.PROVENANCE_FILE).read_text())["build"]


def test_an_unreadable_record_or_code_edited_mid_build_is_not_vouched_for(tmp_path, monkeypatch):
    calls = []
    path = stages.cached_stage("probes-x", {"a": 1}, tmp_path, _builder(calls), log=None)
    (path / stages.PROVENANCE_FILE).write_text("{not json")
    assert "cannot be read" in stages.stage_code_change(path)

    digests = iter(["before", "after"])  # cached_stage reads the code before the build, provenance after
    real = stages.code_digest
    monkeypatch.setattr(stages, "code_digest", lambda kind: {**real(kind), "digest": next(digests)})
    edited = stages.cached_stage("probes-y", {"a": 1}, tmp_path, _builder(calls), log=None)
    monkeypatch.undo()
    assert json.loads((edited / stages.PROVENANCE_FILE).read_text())["code"] is None
    assert "edited while it was built" in stages.stage_code_change(edited)

