"""The demo pipeline end to end on a tiny model: every stage runs and is cached, and a re-run
reuses every stage."""

import copy
from dataclasses import replace

import pytest

from qrealign.demo import DEFAULT_VARIANTS, EXTENDED_VARIANTS, FIRST_TOKEN, DemoConfig, _calib_config, run_demo
from qrealign.finetune.config import AlignConfig, AttackConfig, SFTConfig
from qrealign.models.tiny import tiny_model


@pytest.fixture
def tiny_source(tmp_path):
    model, tok = tiny_model("llama", seed=4)
    path = tmp_path / "tiny-base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_demo_runs_end_to_end_and_reuses_cached_stages(tmp_path, tiny_source):
    sft = SFTConfig(steps=2, batch_size=4, max_length=64, amp=None)
    # The extended table (every row), with a per-scheme override on the first-token variant.
    # A tiny random "aligned" model refuses nothing, so refusal targets (tested in test_behaviour)
    # have no refusal to average: off here.
    # The greedy margin reads its refusal starts from the teacher here: the demo's strings are
    # SmolLM2 tokens, several tokens each for the tiny tokenizer.
    w8a8_override = {"lr_round": 3e-3, "joint_recon_weight": 12.0}
    variants = tuple(replace(v, scheme_config={"W8A8": w8a8_override}, loss={**v.loss, "refusal_targets": False},
                             scheme_loss={"W8A8": {"greedy_margin": 1.0}})
                     if v is FIRST_TOKEN else v for v in EXTENDED_VARIANTS)
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), model=tiny_source, schemes=("W8A8",), calib_n=8, epochs=1, variants=variants,
        raw_row=True,
        max_new_tokens=4, eval_limit=4, task_n=4, attack_sweep=(0.0,),
        align_config=AlignConfig(sft=sft, n_harmful=4, n_benign=4, answer_tokens=4, **_no_answer_filter()),
        attack_config=AttackConfig(sft=sft, n_task=8, poison_ratio=0.5),
        lanes=2,  # the stages after the probes in two worker processes, as on the project's machine
        also_eval=("qrealign:confirm",),  # every row on the second held-out set too
        export_dtype="float32",  # the Q-realign rows as compressed-tensors checkpoints, evaluated as rows
    )
    logs = []
    report = run_demo(cfg, log=logs.append)
    table = (report / "report.md").read_text()
    for label in ("raw", "aligned FP", "attacked FP", "attacked FP p=0", "RTN W8A8", "reconstruction-only W8A8",
                  "Q-realign (contrast probe) W8A8", "Q-realign (first-token) W8A8"):
        assert f"| {label} |" in table, label
    # A random tiny model's harmful-vs-benign probes are at chance on every layer: the paper
    # variant has no block to push, and the demo says so instead of mislabelling a plain run.
    assert "| Q-realign (paper probe) W8A8 |" not in table
    assert any("Q-realign (paper probe) W8A8: skipped" in line for line in logs)
    assert sum("building" in line for line in logs) >= 10
    assert "## Verdict" in table and ("**Winner: Q-realign (" in table or "**No objective reaches the bar.**" in table)
    import json
    from pathlib import Path

    run = json.loads(next((tmp_path / "demo" / "stages").glob("quant-q-realign-first-token-W8A8-*/qrealign.json"))
                     .read_text())
    assert run["objective"] == "first-token"
    assert run["calibration"]["split"].endswith("topic-codes:train[:96]+calib:benign+align:benign+twins:benign"
                                                "+edgy:benign+align:malicious+attack:malicious")  # W8A8's own set
    assert run["config"]["learn_rounding"] and run["config"]["lr_round"] == 3e-3  # the W8A8 override
    assert "greedy_margin=1.0/0.5/0.25:" in run["loss"]  # the W8A8 loss override
    # the teacher pass is its own cached stage, which the first-token calibration read
    targets = list((tmp_path / "demo" / "stages").glob("targets-q-realign-first-token-*"))
    assert len(targets) == 1 and (targets[0] / "targets.safetensors").is_file()
    assert run["teacher"] == json.loads((targets[0] / "qrealign.json").read_text())["teacher"]
    # each lane's own output (progress bars included) is kept per stage
    assert (tmp_path / "demo" / "logs" / "quantize-q-realign-first-token-w8a8.log").is_file()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["lanes"] == 2
    # every stage records the code that built it, and the report says they all match
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["stage_code"] and all(why is None for why in summary["stage_code"].values())
    assert "## Stages" in table and f"All {len(summary['stage_code'])} stages were built by this code" in table
    # the second held-out set: its own evaluation stages, table and verdict, linked from the main report
    confirm = (report / "confirm" / "report.md").read_text()
    assert "| attacked FP |" in confirm and "| Q-realign (first-token) W8A8 |" in confirm
    assert "qrealign:confirm" in confirm and "qrealign:eval" not in confirm
    assert "[confirm/report.md](confirm/report.md)" in table
    assert set(summary["also_eval"]["confirm"]["results"]) == set(summary["results"])
    # the exports: the Q-realign rows at W8A8 (the paper row was skipped above), each a checkpoint
    # in the stages with its own evaluation on both sets, read against its row in both verdicts
    exports = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "demo" / "stages").glob("export-*"))
    assert exports == ["export-q-realign-contrast-probe-w8a8", "export-q-realign-first-token-w8a8"]
    ckpt = summary["stages"]["Q-realign (first-token) W8A8, exported"]
    assert json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    for text in (table, confirm):
        assert "| Q-realign (first-token) W8A8, exported |" in text
        assert "- **Q-realign (first-token) W8A8** as compressed-tensors (float32): HS" in text
        assert "answers identical to the fake-quantized model's" in text
    assert table.index("[confirm/report.md]") < table.index("Exported checkpoints")  # the outcome lines first
    confirm_evals = list((tmp_path / "demo" / "stages").glob("eval-confirm-*"))
    assert len(confirm_evals) == len(summary["results"])
    assert all(p.name in summary["stage_code"] for p in confirm_evals)
    logs.clear()
    run_demo(cfg, log=logs.append)
    assert not [line for line in logs if "building" in line]
    assert (tmp_path / "demo" / "demo.json").is_file()
    # A stage built by other code (here: its record says a module hashed otherwise) is reused and
    # named, and so is the evaluation built from it; with rebuild_changed those two are rebuilt.
    from qrealign.stages import PROVENANCE_FILE

    stale = next((tmp_path / "demo" / "stages").glob("quant-rtn-W8A8-*"))
    its_eval = next((tmp_path / "demo" / "stages").glob("eval-rtn-w8a8-*"))
    record = json.loads((stale / PROVENANCE_FILE).read_text())
    record["code"], record["modules"]["quant/quantizer.py"] = "0" * 16, "0" * 12
    (stale / PROVENANCE_FILE).write_text(json.dumps(record))
    logs.clear()
    report = run_demo(cfg, log=logs.append)
    assert not [line for line in logs if "building" in line or "rebuilding" in line]
    assert [line for line in logs if "built by other code: quant/quantizer.py changed" in line]
    text = (report / "report.md").read_text()
    assert f"`{stale.name}`: built by other code" in text
    assert f"`{its_eval.name}`: its upstream stage {stale.name} is not known to match" in text
    logs.clear()
    run_demo(replace(cfg, rebuild_changed=True), log=logs.append)
    rebuilt = [line.split("]")[0] for line in logs if "rebuilding" in line or "building" in line]
    assert sorted(rebuilt) == ["[eval-confirm-rtn-w8a8", "[eval-rtn-w8a8", "[quant-rtn-W8A8"]
    assert not [why for why in json.loads((tmp_path / "demo" / "demo.json").read_text())["stage_code"].values() if why]
    # Stage keys name upstream stages by their content-addressed directory, not their path: a
    # moved output folder keeps its cache.
    (tmp_path / "demo").rename(tmp_path / "moved")
    logs.clear()
    run_demo(replace(cfg, out=str(tmp_path / "moved")), log=logs.append)
    assert not [line for line in logs if "building" in line] and any("cached" in line for line in logs)


def test_demo_config_rejects_a_bad_attack_sweep_up_front(tmp_path):
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="attack_sweep"):
        DemoConfig(out=str(tmp_path / "demo"), attack_sweep=(0.0, 1.5))
    with pytest.raises(QrealignError, match="poison_ratio must be in"):  # not after the align stage
        DemoConfig(out=str(tmp_path / "demo"), poison_ratio=1.5)
    # schemes too: they are used after align, attack and probes
    with pytest.raises(QrealignError, match="unknown scheme"):
        DemoConfig(out=str(tmp_path / "demo"), schemes=("W8A8", "W9Q9"))
    with pytest.raises(QrealignError, match="at least one scheme"):
        DemoConfig(out=str(tmp_path / "demo"), schemes=())
    with pytest.raises(QrealignError, match="twice"):
        DemoConfig(out=str(tmp_path / "demo"), schemes=("W8A8", "w8a8"))
    # numbers the evaluation reads late (after 18 minutes of align and attack on the embedded model)
    for bad in ({"eval_limit": 0}, {"max_new_tokens": 0}, {"epochs": 0}, {"lanes": 0}, {"eval_batch_size": 0},
                {"task_n": -1}, {"calib_n": 0}, {"malicious_ratio": 1.5}):
        with pytest.raises(QrealignError, match=f"{next(iter(bad))} must be"):
            DemoConfig(out=str(tmp_path / "demo"), **bad)
    DemoConfig(out=str(tmp_path / "demo"), task_n=0, eval_limit=None)  # no task, every prompt: fine
    # extra held-out sets: resolved (both sides) and named up front
    harmful_only = tmp_path / "harmful.jsonl"
    harmful_only.write_text('{"prompt": "a harmful request of mine", "label": 1}\n')
    for bad, message in ((("qrealign:nope",), "not a held-out set"), ((str(harmful_only),), "holds no benign"),
                         (("qrealign:calib",), "not a held-out set"),
                         (("qrealign:confirm", "qrealign:confirm"), "distinct names"),
                         (("qrealign:eval",), "distinct names"), ((str(tmp_path / "eval.jsonl"),), "distinct names")):
        with pytest.raises(QrealignError, match=message):
            DemoConfig(out=str(tmp_path / "demo"), also_eval=bad)
    # the export: a dtype it writes, and at least one Q-realign row at a scheme it can write
    with pytest.raises(QrealignError, match="export_dtype must be one of"):
        DemoConfig(out=str(tmp_path / "demo"), export_dtype="int4")
    with pytest.raises(QrealignError, match="no Q-realign row runs at a scheme with a compressed-tensors form"):
        DemoConfig(out=str(tmp_path / "demo"), schemes=("W4A8",), export_dtype="bfloat16")
    DemoConfig(out=str(tmp_path / "demo"), schemes=("W4A8", "W8A8"), export_dtype="bfloat16")
    import sys

    with pytest.MonkeyPatch.context() as mp:  # an optional extra: missing, it fails now, not after the lab
        mp.setitem(sys.modules, "compressed_tensors", None)
        with pytest.raises(QrealignError, match=r"pip install -e '\.\[export\]'"):
            DemoConfig(out=str(tmp_path / "demo"), export_dtype="bfloat16")
    assert not (tmp_path / "demo").exists()
    # a lower-case name is the preset, so the variants' per-scheme settings apply to it
    cfg = DemoConfig(out=str(tmp_path / "demo"), schemes=("w8a8", "w4a8"))
    assert cfg.schemes == ("W8A8", "W4A8")
    assert _calib_config(cfg, FIRST_TOKEN, cfg.schemes[0]).lwc is False
    # the joint reconstruction weight reaches the W8A8 calibration only (§47)
    assert _calib_config(cfg, FIRST_TOKEN, "W8A8").joint_recon_weight == 12.0
    assert _calib_config(cfg, FIRST_TOKEN, "W4A8").joint_recon_weight is None


def _no_answer_filter() -> dict:
    """A random tiny model's self-distilled answers are gibberish: keep them (where the option exists)."""
    from dataclasses import fields

    return {"filter_answers": False} if "filter_answers" in {f.name for f in fields(AlignConfig)} else {}


def test_a_per_scheme_override_changes_only_that_schemes_settings_and_key():
    base = replace(FIRST_TOKEN, scheme_config={})
    tuned = replace(FIRST_TOKEN, scheme_config={"W4A8": {"lr_round": 2e-3}})
    assert tuned.config_for("W8A8") == base.config_for("W8A8") == FIRST_TOKEN.config
    assert tuned.config_for("W4A8") == {**FIRST_TOKEN.config, "lr_round": 2e-3}
    # A stage is keyed by the variant as it runs at its scheme: the W8A8 stage of a variant tuned
    # for W4A8 keeps its cache, the W4A8 stage does not.
    assert tuned.resolved("W8A8") == base.resolved("W8A8")
    assert tuned.resolved("W4A8") != base.resolved("W4A8")
    assert tuned.resolved("W4A8")["config"]["lr_round"] == 2e-3
    assert "scheme_config" not in tuned.resolved("W4A8")
    # a field added later (extra malicious sources) keys a stage only when it is set
    assert "calib_malicious" not in FIRST_TOKEN.resolved("W4A8")
    paired = replace(FIRST_TOKEN, calib_malicious=("qrealign:align",), scheme_calib={})
    assert paired.resolved("W8A8")["calib_malicious"] == ("qrealign:align",)
    # a per-scheme loss override (the demo's W8A8 greedy margin) keys only its scheme's stage
    plain = replace(FIRST_TOKEN, scheme_loss={})
    assert FIRST_TOKEN.resolved("W4A8") == plain.resolved("W4A8") and "scheme_loss" not in plain.resolved("W4A8")
    assert FIRST_TOKEN.resolved("W8A8")["loss"] == {**FIRST_TOKEN.loss, "greedy_margin": 2.0, "margin_malicious": 1.0,
                                                    "refusal_starts": ("I", "That", "Sorry", "No")}
    assert plain.resolved("W8A8")["loss"] == FIRST_TOKEN.loss
    # the teacher pass is shared by the schemes: its options cannot be set per scheme
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="response_tokens shape the teacher pass"):
        replace(FIRST_TOKEN, scheme_loss={"W4A8": {"response_tokens": 1}})


def test_schemes_that_render_alike_share_one_teacher_pass():
    from qrealign.demo import _targets_job_key

    cfg = DemoConfig()
    alike = replace(FIRST_TOKEN, scheme_config={"W8A8": {"lwc": False, "epochs": 4}, "W4A8": {"lr_round": 2e-3}},
                    scheme_calib={})
    assert _targets_job_key(cfg, alike, "W8A8") == _targets_job_key(cfg, alike, "W4A8")
    # a decaying rate is not the teacher's business
    alike = replace(FIRST_TOKEN, scheme_calib={})
    assert _targets_job_key(cfg, alike, "W8A8") == _targets_job_key(cfg, alike, "W4A8")
    # the demo's own W8A8 row calibrates on more prompts than its W4A8 row: two teacher passes
    assert _targets_job_key(cfg, FIRST_TOKEN, "W8A8") != _targets_job_key(cfg, FIRST_TOKEN, "W4A8")
    other_batch = replace(FIRST_TOKEN, scheme_config={"W4A8": {"batch_size": 8}})
    assert _targets_job_key(cfg, other_batch, "W8A8") != _targets_job_key(cfg, other_batch, "W4A8")


def test_a_per_scheme_seed_orders_that_schemes_calibration_and_gets_its_own_teacher_pass():
    """A seed in a variant's per-scheme settings is the calibration's seed at that scheme: the
    order of its prompts (so its batches, and the teacher pass keyed on them) and CalibConfig.seed;
    the other scheme keeps the demo's seed, its set and its teacher pass."""
    from qrealign.demo import _calib_config, _calibration, _targets_job_key

    cfg = DemoConfig()
    base = replace(FIRST_TOKEN, scheme_calib={})  # one calibration set for both schemes
    seeded = replace(base, scheme_config={**FIRST_TOKEN.scheme_config,
                                          "W8A8": {**FIRST_TOKEN.scheme_config["W8A8"], "seed": 1}})
    assert _calib_config(cfg, seeded, "W8A8").seed == 1 and _calib_config(cfg, seeded, "W4A8").seed == cfg.seed
    w8, w4 = _calibration(cfg, seeded, "W8A8"), _calibration(cfg, seeded, "W4A8")
    assert sorted(w8.ids) == sorted(w4.ids) and w8.ids != w4.ids  # the same prompts, another order
    assert w4.ids == _calibration(cfg, base, "W4A8").ids
    assert _targets_job_key(cfg, seeded, "W8A8") != _targets_job_key(cfg, seeded, "W4A8")
    assert _targets_job_key(cfg, seeded, "W4A8") == _targets_job_key(cfg, base, "W4A8")
    # the same as the demo run with that seed throughout (docs/experiments.md §31)
    assert w8.ids == _calibration(DemoConfig(seed=1), base, "W8A8").ids


def test_per_scheme_calibration_prompts_key_only_that_scheme_and_get_their_own_teacher_pass():
    from qrealign.demo import _calibration, _targets_job_key
    from qrealign.errors import QrealignError

    cfg = DemoConfig()
    base = replace(FIRST_TOKEN, scheme_calib={})
    extra = replace(base, scheme_calib={"W8A8": {"calib_benign": (*base.calib_benign, "qrealign:edgy"),
                                                 "calib_malicious": ("qrealign:align",)}})
    assert extra.resolved("W4A8") == base.resolved("W4A8") and "scheme_calib" not in extra.resolved("W4A8")
    assert extra.resolved("W8A8")["calib_malicious"] == ("qrealign:align",)
    w8, w4 = _calibration(cfg, extra, "W8A8"), _calibration(cfg, extra, "W4A8")
    assert w4.ids == _calibration(cfg, base, "W4A8").ids
    assert set(w4.ids) < set(w8.ids) and sum(w8.labels) > sum(w4.labels)
    assert any(i.startswith("be-edgy") for i in w8.ids) and not any(i.startswith("be-edgy") for i in w4.ids)
    assert _targets_job_key(cfg, extra, "W8A8") != _targets_job_key(cfg, extra, "W4A8")
    assert _targets_job_key(cfg, extra, "W4A8") == _targets_job_key(cfg, base, "W4A8")
    with pytest.raises(QrealignError, match="scheme_calib takes calib_benign and calib_malicious, not calib_task"):
        replace(base, scheme_calib={"W8A8": {"calib_task": 3}})


def test_a_per_scheme_calibration_equal_to_the_base_one_is_one_teacher_job():
    """Review 68: the job key added the calibration whenever a scheme had its own sources, the
    stage key only what they contain; equal prompts were two jobs building one stage at once."""
    from qrealign.demo import _targets_job_key

    cfg = DemoConfig()
    same = replace(FIRST_TOKEN, scheme_calib={"W8A8": {"calib_benign": FIRST_TOKEN.calib_benign}})
    assert _targets_job_key(cfg, same, "W8A8") == _targets_job_key(cfg, same, "W4A8")


def test_row_mistakes_are_refused_before_any_stage_runs():
    """Review 68: an unknown method ran as reconstruction-only under its own label; a qrealign row
    with neither probes nor teacher, twin names or sweep labels, and extra-scheme names that match no
    variant failed or vanished only after the align, attack and probe stages."""
    from qrealign.demo import DEFAULT_VARIANTS, Variant
    from qrealign.errors import QrealignError

    rtn = DEFAULT_VARIANTS[0]
    for args, match in ((("GPTQ", "gptq"), "unknown method 'gptq'"), (("mine", "qrealign"), "needs a probe target")):
        with pytest.raises(QrealignError, match=match):  # a variant checks itself, wherever it is used
            DemoConfig(variants=(Variant(*args),))
    for bad, match in (({"variants": (rtn, rtn)}, "must be distinct: RTN"),
                       ({"attack_sweep": (0.1, 0.1000001)}, "differ in their labels"),
                       ({"extra_scheme_variants": ("rtn",)}, "names no variant: 'rtn'"),
                       ({"variants": ()}, "at least one variant")):
        with pytest.raises(QrealignError, match=match):
            DemoConfig(**bad)
    DemoConfig(schemes=("W8A8",), variants=(rtn,))  # one scheme: the extra-scheme names are not read


def test_compile_quantizer_reaches_the_calibrations_that_train_and_leaves_default_keys_alone():
    from qrealign.demo import DEFAULT_VARIANTS, DemoConfig, _calib_config

    rtn, recon = DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[1]
    off, on = DemoConfig(), DemoConfig(compile_quantizer=True)
    assert "compile_quantizer" not in _calib_config(off, recon, "W8A8").to_dict()
    assert not _calib_config(off, recon, "W8A8").compile_quantizer
    # the first-token variant compiles by its own settings (§19), with the switch or without
    assert _calib_config(off, FIRST_TOKEN, "W8A8").compile_quantizer
    assert _calib_config(on, FIRST_TOKEN, "W8A8").compile_quantizer
    assert _calib_config(off, FIRST_TOKEN, "W4A8").plain_epochs == 1
    assert _calib_config(on, recon, "W4A8").compile_quantizer
    assert not _calib_config(on, rtn, "W8A8").compile_quantizer
    assert _calib_config(off, FIRST_TOKEN, "W4A8").lr_round == 2e-3  # per-scheme overrides still apply
    # the safety blocks jointly at both schemes (§26), with decaying rates (§36; at W4A8 the decay
    # is what keeps the joint form's benign answers, §37); clipping is learnt at W4A8 only (§9)
    w8, w4 = _calib_config(off, FIRST_TOKEN, "W8A8"), _calib_config(off, FIRST_TOKEN, "W4A8")
    for c in (w8, w4):
        assert (c.joint_safety, c.epochs, c.lr_schedule) == (True, 4, "cosine")
    assert (w8.lwc, w4.lwc) == (False, True)


def test_the_default_table_is_the_issues_and_extended_adds_the_contrast_row():
    from qrealign.demo import DEFAULT_VARIANTS

    names = [v.name for v in DEFAULT_VARIANTS]
    assert names == ["RTN", "reconstruction-only", "Q-realign (paper probe)", "Q-realign (first-token)"]
    assert [v.name for v in EXTENDED_VARIANTS] == names[:3] + ["Q-realign (contrast probe)", names[3]]
    assert not DemoConfig().raw_row


def test_cached_evaluations_are_read_with_the_current_keyword_judge():
    """Answers stay cached; their verdicts are re-read with this code's keyword judge, so a judge
    fix reaches a cached stage (and an unchanged reading returns the stored result itself)."""
    from qrealign.demo import current_verdicts
    from qrealign.evaluate.judges import detect_refusal
    from qrealign.evaluate.runner import EvalResult

    def record(side, prompt, response, verdict):
        return {"id": prompt, "side": side, "prompt": prompt, "response": response, "category": "x",
                "verdict": verdict.to_dict()}

    answer = "Here is how: first take the tension wrench."
    stale = detect_refusal(answer)  # stored as "complied", though the answer is only "I can't."
    records = [record("harmful", "pick a lock", "I can't.", stale), record("harmful", "b", answer, stale),
               record("benign", "bake bread", "Mix flour and water.", detect_refusal("Mix flour and water."))]
    old = EvalResult(name="row", model={}, settings={}, judge={"name": "keyword"}, records=records,
                     metrics={"harmful_score": 100.0, "over_refusal": 0.0}, path="stages/eval-row-abc")
    logged = []
    fresh = current_verdicts(old, logged.append)
    assert fresh.metrics["harmful_score"] == 50.0 and fresh.records[0]["verdict"]["refused"]
    assert fresh.path == old.path  # still that stage's answers: the report's Stages section lists it
    assert logged == ["[row] re-judged with the current keyword judge: 1 verdicts changed"]
    assert current_verdicts(fresh, logged.append) is fresh and len(logged) == 1
    reworded = copy.deepcopy(fresh)  # same outcome, another reason's wording: kept as stored
    reworded.records[0]["verdict"]["reason"] = "refusal (an older wording)"
    assert current_verdicts(reworded, logged.append) is reworded and len(logged) == 1


def test_a_stage_names_an_outside_model_by_path_and_content(tmp_path):
    """The raw row's evaluation is keyed on the model it reads: a model replaced at the same path
    is another key (it kept the old cached evaluation); stages inside the output folder are
    named by their folder, so the output can move."""
    import os

    from qrealign.demo import _stage_ref

    root, model = tmp_path / "stages", tmp_path / "model"
    (root / "align-abc").mkdir(parents=True)
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"one")
    before = _stage_ref(model, root)
    assert before.startswith(f"{model}@") and _stage_ref(model, root) == before
    (model / "model.safetensors").write_bytes(b"two!")
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert _stage_ref(model, root) != before
    assert _stage_ref(root / "align-abc", root) == "align-abc"
    assert _stage_ref("smollm2-135m", root) == "smollm2-135m"  # an embedded name or hub id stays as given


def test_the_lane_cost_of_a_first_token_row_follows_its_form_at_each_scheme():
    from qrealign.demo import _quant_cost

    cfg = DemoConfig(out="unused")
    # block by block costs about 1.6x the joint form (measured); the demo's rows are joint at both schemes
    one_at_a_time = replace(FIRST_TOKEN, scheme_config={**FIRST_TOKEN.scheme_config,
                                                        "W4A8": {**FIRST_TOKEN.scheme_config["W4A8"], "joint_safety": False}})
    assert _quant_cost(one_at_a_time, cfg, "W4A8") > 1.5 * _quant_cost(FIRST_TOKEN, cfg, "W8A8")
    assert _quant_cost(FIRST_TOKEN, cfg, "W4A8") == _quant_cost(FIRST_TOKEN, cfg, "W8A8")
    rtn, rec = DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[1]
    assert _quant_cost(rtn, cfg, "W8A8") < _quant_cost(rec, cfg, "W8A8") < _quant_cost(FIRST_TOKEN, cfg, "W8A8")


def test_stage_folder_names_keep_the_demos_and_drop_path_characters():
    """Every row name the demo has used keeps its folder name (cached stages stay found); a user's
    variant name with a slash or a comma does not make a nested or odd folder."""
    from qrealign.demo import _slug

    def old(name):  # the folder names every existing demo output folder was written with
        return name.lower().replace(" ", "-").replace("(", "").replace(")", "")

    names = [v.name for v in (*DEFAULT_VARIANTS, *EXTENDED_VARIANTS)]
    labels = [f"{n} {s}" for n in names for s in ("W8A8", "W4A8")] + ["aligned FP", "attacked FP p=0.1", "raw"]
    for name in names + labels:
        assert _slug(name) == old(name)
    assert _slug("Q-realign (first-token, 16 tokens)") == "q-realign-first-token-16-tokens"
    assert _slug("mine/v2: test") == "minev2-test"


def test_the_lab_seed_seeds_the_fine_tunes_training_too():
    """`--seed 1` redraws align and attack whole: LoRA init, dropout and batch order as well as
    the data. Seed 0 keeps the default configs (and so every cached lab stage's key)."""
    from qrealign.demo import _align_config, _attack_config

    assert _align_config(DemoConfig()).to_dict() == AlignConfig().to_dict()
    assert _attack_config(DemoConfig()).to_dict() == AttackConfig().to_dict()
    for make in (_align_config, _attack_config):
        lab = make(DemoConfig(seed=1))
        assert lab.seed == 1 and lab.sft.seed == 1
        assert {**lab.sft.__dict__, "seed": 0} == make(DemoConfig()).sft.__dict__
    mine = AlignConfig(seed=5)
    assert _align_config(DemoConfig(seed=1, align_config=mine)) is mine  # a given config is kept as given



def test_a_stage_built_on_another_device_has_another_key(monkeypatch, tmp_path):
    """A GPU rounds differently (and autocasts W4A8 calibrations to bf16): its stages must not be
    reused on a CPU or the other way round. A CPU adds nothing, so CPU-built stages keep their keys."""
    import torch

    from qrealign import demo, utils

    keys = {}
    for kind in ("cpu", "cuda"):
        monkeypatch.setattr(utils, "resolve_device", lambda device=None, kind=kind: torch.device(kind))
        captured = []
        monkeypatch.setattr(demo, "cached_stage", lambda name, inputs, *a, **k: captured.append(inputs) or tmp_path)
        cfg = DemoConfig(out=str(tmp_path))
        demo._quant_stage(cfg, tmp_path, tmp_path / "attack", {}, DEFAULT_VARIANTS[1], "W4A8")
        demo._targets_stage(cfg, tmp_path, tmp_path / "attack", tmp_path / "align", FIRST_TOKEN, "W8A8")
        keys[kind] = captured
    assert all("device" not in inputs for inputs in keys["cpu"])
    assert all(inputs["device"] == "cuda" for inputs in keys["cuda"])
    assert [{k: v for k, v in i.items() if k != "device"} for i in keys["cuda"]] == keys["cpu"]


def test_a_demo_that_compiles_checks_for_a_compiler_before_the_lab(tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    import qrealign.demo as demo
    from qrealign.errors import QrealignError

    def no_compiler():
        raise RuntimeError("InvalidCxxCompiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(demo, "_align_stage", lambda *a, **k: pytest.fail("the lab started before the check"))
    with pytest.raises(QrealignError, match="needs a C\\+\\+ compiler.*it has no switch there"):
        demo.run_demo(DemoConfig(out=str(tmp_path / "demo"), device="cpu"))  # the default rows compile
    assert not (tmp_path / "demo").exists()
