"""CLI input checks that must fire before a model loads: a typo costs a second, not a model load
(minutes for a 70B model) or a calibration."""

import json

import pytest
import torch

import qrealign.models
from qrealign.cli import main
from qrealign.errors import QrealignError
from qrealign.models.tiny import tiny_model


@pytest.fixture
def model_dir(tmp_path):
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def no_load(monkeypatch):
    """Loading the weights is a test failure: every check here must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(qrealign.models, "load_model", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--calib-task-n", "5"], "--calib-task-n needs --calib-task"),
    (["--calib-task", "topic-codes", "--calib-task-n", "0"], "--calib-task-n must be >= 1"),
    (["--method", "rtn", "--learn-rounding"], "--learn-rounding set(s) calibration training"),
    # every training option, not three of them: RTN used to record --epochs 10 / --lr-lwc in its run, unapplied
    (["--method", "rtn", "--epochs", "10", "--lr-lwc", "0.1", "--no-let"],
     "--epochs, --lr-lwc, --no-let set(s) calibration training"),
    (["--method", "rtn", "--lr-schedule", "cosine"], "--lr-schedule set(s) calibration training"),
    (["--scheme", "W4A16-g48"], "group size 48 does not divide this model's input width 64; use a scheme whose group divides it, e.g. -g64 in the scheme's name"),
])
def test_quantize_flags_checked_before_loading(model_dir, tmp_path, capsys, no_load, extra, message):
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_calibration_file_with_eval_prompts_is_refused_before_calibrating(model_dir, tmp_path, capsys, no_load):
    from qrealign.data.prompts import load_prompts

    held_out = load_prompts(split="eval", label=1)[0].text
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": held_out.upper(), "label": 1}) + "\n"
                 + "".join(json.dumps({"prompt": f"my request {i}", "label": i % 2}) + "\n" for i in range(8)))
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "run"), "--calib", str(f)]) == 2
    assert "1 of its prompts are in qrealign's held-out eval split" in capsys.readouterr().err


def test_realign_probe_checks_come_before_loading(model_dir, tmp_path, capsys, no_load):
    import numpy as np

    from qrealign.probes.fit import fit_probes

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, (3, 20, 48)), rng.normal(-1, 1, (3, 20, 48))  # 3 blocks of width 48
    probes = fit_probes(pos, neg, progress=False, cv=3)
    probes.save(tmp_path / "probes")
    out = ["--out", str(tmp_path / "run")]
    assert main(["realign", str(model_dir), "--probes", str(tmp_path / "probes"), *out]) == 2
    assert "are for 3 blocks of width 48" in capsys.readouterr().err
    assert main(["realign", str(model_dir), "--probes", str(tmp_path / "probes"), "--system", "be nice", *out]) == 2
    assert "calibrate with the same one (CalibConfig(system=...), --system)" in capsys.readouterr().err
    assert main(["realign", str(model_dir), "--probes", str(tmp_path / "probes"), "--layers", "7", *out]) == 2
    assert "not blocks of this 3-block model" in capsys.readouterr().err


def test_eval_reads_its_prompt_sets_task_and_out_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    import qrealign.evaluate.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(runner, "load_for_eval", refuse)
    out = ["--out", str(tmp_path / "ev")]
    assert main(["eval", str(model_dir), "--benign", str(tmp_path / "typo.csv"), *out]) == 2
    assert "typo.csv" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--task", "mmlu-pro", *out]) == 2
    assert "unknown task" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert main(["eval", str(model_dir), "--out", str(tmp_path / "precious")]) == 2
    assert (tmp_path / "precious" / "notes.txt").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--task", "topic-codes", "--task-n", "0"], "--task-n must be >= 1"),
    (["--task-n", "5"], "--task-n needs --task"),
    (["--no-harmful", "--no-benign"], "nothing to evaluate"),
    (["--judge", "harmbench:./no-such-judge"], "no-such-judge does not exist"),
    (["--backend", "vllm", "--drop-finished"], "--drop-finished is the transformers backend's"),
    (["--lm-eval-fewshot", "0"], "--lm-eval-fewshot needs --lm-eval"),  # used to be dropped without a word
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
])
def test_eval_checks_what_failed_after_the_load_or_the_generation(model_dir, tmp_path, capsys, monkeypatch,
                                                                   extra, message):
    import qrealign.evaluate.runner as runner

    monkeypatch.setattr(runner, "load_for_eval", lambda *a, **k: pytest.fail("loaded before the input check"))
    assert main(["eval", str(model_dir), *extra, "--out", str(tmp_path / "ev")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_eval_vllm_checks_come_before_the_load(model_dir, tmp_path, capsys, monkeypatch):
    import qrealign.evaluate.generate as generate
    import qrealign.evaluate.runner as runner

    monkeypatch.setattr(runner, "load_for_eval", lambda *a, **k: pytest.fail("loaded before the input check"))
    monkeypatch.setattr(generate, "vllm_available", lambda: False)
    out = ["--out", str(tmp_path / "ev")]
    assert main(["eval", str(model_dir), "--backend", "vllm", *out]) == 2
    assert "needs vLLM" in capsys.readouterr().err
    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "qrealign.json").write_text(json.dumps({"kind": "quantized"}))
    for model, more in ((run, []), (model_dir, ["--adapter", str(tmp_path / "lora")]), ("smollm2-135m", [])):
        assert main(["eval", str(model), "--backend", "vllm", *more, *out]) == 2
        assert "only evaluates a plain model directory" in capsys.readouterr().err
    # an export is what vLLM serves, but not in float32 (the default --dtype): said before the load
    export = tmp_path / "export"
    export.mkdir()
    (export / "qrealign.json").write_text(json.dumps({"kind": "export"}))
    assert main(["eval", str(export), "--backend", "vllm", *out]) == 2
    assert "pass --dtype bfloat16" in capsys.readouterr().err


def test_rejudge_refuses_options_it_would_ignore(tmp_path, capsys):
    earlier = tmp_path / "ev"
    earlier.mkdir()
    assert main(["eval", str(earlier), "--rejudge", "--limit", "10", "--out", str(tmp_path / "again")]) == 2
    assert "reads no --limit" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert main(["eval", str(earlier), "--rejudge", "--out", str(tmp_path / "precious")]) == 2
    assert "not an earlier output" in capsys.readouterr().err
    # an earlier output given without --rejudge: said what it is, not "has no config.json" (review 79)
    (earlier / "result.json").write_text("{}")
    assert main(["eval", str(earlier), "--judge", "keyword", "--out", str(tmp_path / "again")]) == 2
    assert "is an evaluation output, not a model: to judge its answers again, add --rejudge" in capsys.readouterr().err


def test_rejudge_takes_the_debug_switch(model_dir, tmp_path):
    """--debug asks for tracebacks; --rejudge used to refuse it as an eval option it would ignore
    (review 69), so the user got a traceback about asking for one."""
    earlier = tmp_path / "ev"
    assert main(["eval", str(model_dir), "--limit", "1", "--max-new-tokens", "2", "--out", str(earlier)]) == 0
    assert main(["eval", str(earlier), "--rejudge", "--debug", "--out", str(tmp_path / "again")]) == 0
    assert main(["--debug", "eval", str(earlier), "--rejudge", "--out", str(tmp_path / "again2")]) == 0


@pytest.mark.parametrize("command", ["align", "attack"])
def test_full_fine_tuning_refuses_the_lora_options_it_would_drop(model_dir, tmp_path, capsys, monkeypatch, command):
    import qrealign.finetune.stage as stage

    monkeypatch.setattr(stage, "finetune_stage", lambda *a, **k: pytest.fail("trained before the check"))
    out = ["--out", str(tmp_path / "ft")]
    assert main([command, str(model_dir), "--full", "--lora-targets", "q_proj", "--lora-r", "4", *out]) == 2
    assert "--full fine-tunes every weight and reads no --lora-r, --lora-targets" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_eval_refuses_one_prompt_on_both_sides(model_dir, tmp_path, capsys):
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"request {i}"}) + "\n" for i in range(3)))
    assert main(["eval", str(model_dir), "--harmful", str(f), "--benign", str(f), "--out", str(tmp_path / "ev")]) == 2
    assert "in both the harmful and the benign set" in capsys.readouterr().err


def test_the_cli_training_defaults_are_the_engine_defaults():
    """`quantize`/`realign` without options train as `CalibConfig()` does (a drifted CLI default
    would make the two entry points different runs)."""
    from qrealign.calibrate.engine import CalibConfig
    from qrealign.cli import build_parser

    args = build_parser().parse_args(["quantize", "M", "--out", "O"])
    config, flags = CalibConfig(), {"no_let": "let", "no_lwc": "lwc"}
    for name in ("epochs", "epoch_schedule", "plain_epochs", "lr_let", "lr_lwc", "lwc_init", "learn_rounding",
                 "lr_round", "rope_invariant_qk", "autocast", "compile_quantizer", "offload_targets", "batch_size",
                 "max_length", "seed"):
        assert getattr(args, name) == getattr(config, name), name
    for flag, field in flags.items():
        assert getattr(args, flag) is not getattr(config, field)
    assert args.lr_schedule == "constant" and config.lr_schedule is None  # "constant" is the engine's None


def test_demo_export_takes_an_optional_dtype_and_refuses_others(capsys):
    """`demo --export` alone exports in bfloat16 (what engines serve), `--export float32` exactly,
    and no flag leaves the export off; a dtype the exporter does not write fails at parse time."""
    from qrealign.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).export is None
    assert parser.parse_args(["demo", "--export"]).export == "bfloat16"
    assert parser.parse_args(["demo", "--export", "float32"]).export == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--export", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_quantize_holds_the_model_in_the_dtype_asked_for(model_dir, tmp_path):
    """`--dtype bfloat16` halves host memory at 7B (review 71: the CLI always loaded float32); the
    run records the dtype and reloads in it."""
    from qrealign.calibrate import load_quantized
    from qrealign.utils import read_json

    out = tmp_path / "run"
    assert main(["quantize", str(model_dir), "--method", "rtn", "--n", "8", "--device", "cpu", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    assert read_json(out / "qrealign.json")["model_dtype"] == "bfloat16"
    model, _, _ = load_quantized(out, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_model_spread_over_devices_by_accelerate_is_refused():
    from qrealign.calibrate.engine import check_unquantized
    from qrealign.errors import QrealignError

    model, _ = tiny_model("llama", seed=0, num_hidden_layers=2)
    model.hf_device_map = {"": 0}  # one device: nothing moves behind the engine's back
    check_unquantized(model)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    with pytest.raises(QrealignError, match="device_map"):
        check_unquantized(model)


def test_every_flag_a_message_names_exists():
    # a message that tells the user which flag to give must name one that some command has: every
    # `--flag` in the package's string literals (docstrings aside) is an option of a qrealign
    # command, or another tool's
    import argparse
    import ast
    import re
    from pathlib import Path

    from qrealign.cli import build_parser

    flags = {"--no-deps", "--s"}  # pip's, in install hints; a matplotlib line style
    for action in build_parser()._actions:
        flags.update(action.option_strings)  # the top-level ones (--version, --debug)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.update(s for a in sub._actions for s in a.option_strings)
    unknown = []
    for path in Path(qrealign.models.__file__).parents[1].rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                unknown += [f"{path.name}: {m}" for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*",
                                                                   node.value) if m not in flags]
    assert len(flags) > 100 and unknown == []


@pytest.mark.parametrize("extra, message", [
    # options a switch turns off are not read: said, not silently recorded (review 79)
    (["--lr-round", "0.5"], "--lr-round is read only with --learn-rounding, which is off here"),
    (["--no-lwc", "--lwc-init", "2"], "--lwc-init is read only with --lwc"),
    (["--no-lwc", "--lr-lwc", "0.5", "--lwc-init", "2"], "--lr-lwc, --lwc-init are read only with --lwc"),
    (["--no-let", "--rope-invariant-qk"], "--rope-invariant-qk is read only with --let"),
    (["--method", "rtn", "--recompute"], "--method rtn trains nothing"),  # the rtn rule first
])
def test_options_a_switch_leaves_unread_are_refused_in_flags(model_dir, tmp_path, capsys, no_load, extra, message):
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_a_recipe_setting_the_user_switches_off_takes_its_options_along():
    # --recipe first-token sets --learn-rounding with its --lr-round, and --lr-let with LET on:
    # --no-learn-rounding / --no-let take those along instead of calling them unread; and a joint
    # stage the recipe set says how to turn it off
    from qrealign.cli import _with_command_defaults, build_parser
    from qrealign.cli._calib_args import check_flags
    from qrealign.errors import QrealignError

    def parsed(*flags):
        parser = build_parser()  # one per command line, as in a process
        argv = ["realign", "M", "--teacher", "T", "--out", "O", "--recipe", "first-token", *flags]
        return _with_command_defaults(parser, parser.parse_args(argv), argv)
    for flags in ((), ("--no-learn-rounding",), ("--no-let",), ("--lwc",)):
        check_flags(parsed(*flags), "omniquant")
    assert parsed("--no-learn-rounding").lr_round == 5e-3 and parsed().lr_round == 1e-2
    with pytest.raises(QrealignError, match="set by --recipe; --no-joint-safety turns it off"):
        check_flags(parsed("--epoch-schedule", "paper", "--epochs", "6"), "omniquant")
    with pytest.raises(QrealignError, match="--lr-round is read only with --learn-rounding"):  # given: the user's
        check_flags(parsed("--no-learn-rounding", "--lr-round", "0.1"), "omniquant")
    # the recipe switched LWC off at W8A8, not the user: said so (review 80)
    with pytest.raises(QrealignError, match=r"--lwc-init is read only with --lwc, which is off here \(--recipe "
                                            r"first-token turns it off at --scheme W8A8\): drop it, or give --lwc"):
        check_flags(parsed("--lwc-init", "2"), "omniquant")
    check_flags(parsed("--lwc-init", "2", "--lwc"), "omniquant")


def test_recompute_with_probes_block_by_block_is_refused_in_flags():
    # --recompute runs blocks again in the backward: the joint stage's, or the first-token tail's
    # (--teacher); a probe loss block by block runs none (review 83)
    from qrealign.cli import _with_command_defaults, build_parser
    from qrealign.cli._calib_args import check_flags
    from qrealign.errors import QrealignError

    def parsed(*flags):
        parser = build_parser()
        argv = ["realign", "M", "--out", "O", *flags]
        return _with_command_defaults(parser, parser.parse_args(argv), argv)
    with pytest.raises(QrealignError, match=r"--recompute runs blocks again in the backward, and this run has none "
                                            r"to run: add --joint-safety, or use --teacher"):
        check_flags(parsed("--probes", "P", "--recompute"), "omniquant")
    check_flags(parsed("--probes", "P", "--recompute", "--joint-safety"), "omniquant")
    check_flags(parsed("--teacher", "T", "--recompute"), "omniquant")


def test_lora_targets_that_name_no_module_fail_before_the_self_distillation(model_dir, tmp_path, capsys, monkeypatch):
    # align generates answers to every benign prompt first (minutes on SmolLM2): a mistyped
    # --lora-targets failed only after it, with a raw tuple (review 79)
    import importlib

    align = importlib.import_module("qrealign.finetune.align")  # the package exports the function too
    monkeypatch.setattr(align, "build_align_data", lambda *a, **k: pytest.fail("generated before the check"))
    assert main(["align", str(model_dir), "--lora-targets", "q_proj,foo", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "LoRA targets foo name no module of this model (--lora-targets); its linear layers:" in err
    assert "q_proj" in err.split("linear layers:")[1] and not (tmp_path / "a").exists()
    from qrealign.finetune.sft import SFTConfig, check_lora_targets

    model, _ = tiny_model("llama", num_hidden_layers=1)
    check_lora_targets(model, SFTConfig(target_modules=("q_proj", "mlp.down_proj")))  # PEFT's suffix rule
    check_lora_targets(model, SFTConfig(target_modules="all-linear"))
    with pytest.raises(QrealignError, match="LoRA targets q_pro name no module"):
        check_lora_targets(model, SFTConfig(target_modules=("q_pro",)))


def test_a_warning_on_the_command_line_is_one_line_of_the_tools(monkeypatch):
    # it printed "file.py:NNN: UserWarning: ..." and a line of source (review 79); --debug keeps that
    import warnings

    import qrealign.cli as cli

    seen = []
    parser = cli.build_parser()
    parser.command_parsers["inspect"].set_defaults(_run=lambda args: seen.append(warnings.formatwarning))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    before = warnings.formatwarning
    assert main(["inspect", "M"]) == 0 and main(["inspect", "M", "--debug"]) == 0
    assert seen == [cli._warning_line, before] and warnings.formatwarning is before  # and put back
    line = cli._warning_line(UserWarning("a weaker result than it looks"), UserWarning, "/x/y.py", 12, "src")
    assert line == "qrealign: warning: a weaker result than it looks\n"


@pytest.mark.parametrize("extra, message", [
    # the library's checks name its parameters; on the command line they read as the flags (review 79)
    (["--batch-size", "0"], "qrealign: error: --batch-size must be >= 1, got 0"),
    (["--max-length", "0"], "qrealign: error: --max-length must be >= 1"),
    (["--malicious-ratio", "2"], "qrealign: error: --malicious-ratio must be in [0, 1], got 2.0"),
])
def test_errors_on_the_command_line_name_flags_not_parameters(model_dir, tmp_path, capsys, no_load, extra, message):
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_message_that_names_the_flag_already_is_left_alone():
    from qrealign.cli import build_parser, in_flags

    parser = build_parser()
    args = parser.parse_args(["realign", "M", "--teacher", "T", "--out", "O"])
    said = "put the term on later blocks (layers_from=0.85; CLI --layers-from 0.85), or lower batch_size"
    assert in_flags(said, parser, args) == said.replace("batch_size", "--batch-size")
    assert in_flags("my_model_dir has no batch_sizes", parser, args) == "my_model_dir has no batch_sizes"


def test_flags_are_not_written_into_the_users_paths(tmp_path, capsys):
    # review 80: an --out folder named batch_size was reported as .../--batch-size
    from qrealign.cli import build_parser, in_flags

    taken = tmp_path / "batch_size"
    taken.mkdir()
    (taken / "mine.txt").write_text("not a run")
    assert main(["quantize", "M", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert str(taken) in err and "--batch-size" not in err
    parser = build_parser()
    args = parser.parse_args(["quantize", "M", "--out", "O", "--calib", "/data/max_length.jsonl"])
    assert in_flags("prompt file not found: /data/max_length.jsonl", parser, args).endswith("/data/max_length.jsonl")
    assert in_flags("see runs/task_n.json and x.max_length", parser, args) == "see runs/task_n.json and x.max_length"
    # a flag that merely starts with another's name does not count as naming it
    args = parser.parse_args(["realign", "M", "--teacher", "T", "--out", "O"])
    assert in_flags("calib_task needs a task (--calib-task-n 5 was given)", parser, args).startswith("--calib-task ")


def test_eval_takes_the_prompt_length_it_cuts_at(model_dir, tmp_path):
    # the truncation warning said "raise max_prompt_tokens", which the CLI could not (review 84)
    import json

    out = tmp_path / "ev"
    assert main(["eval", str(model_dir), "--limit", "1", "--max-new-tokens", "2", "--max-prompt-tokens", "100",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["settings"]["generation"]["max_prompt_tokens"] == 100
