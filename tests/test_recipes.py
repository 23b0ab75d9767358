"""Named realign settings (`qrealign.recipes`): the demo's first-token row and `realign --recipe
first-token` read one definition, so the command a user runs calibrates what the demo measured."""

from types import SimpleNamespace

import pytest

from qrealign import demo
from qrealign.calibrate.behaviour import MARGIN_DEFAULTS
from qrealign.cli import main
from qrealign.cli import realign_cmd
from qrealign.errors import QrealignError
from qrealign.recipes import FIRST_TOKEN, RECIPES, get_recipe


def test_the_demo_row_is_the_recipe_at_each_measured_scheme():
    variant = demo.FIRST_TOKEN
    assert realign_cmd.RECIPE_NAMES == tuple(RECIPES)
    for scheme in ("W8A8", "W4A8", "W4A16"):
        settings = FIRST_TOKEN.at(scheme)
        assert settings.config == variant.config_for(scheme) and settings.loss == variant.loss_for(scheme)
        benign, malicious = variant.calib_for(scheme)
        assert settings.calib_benign == tuple(benign) and settings.calib_malicious == tuple(malicious or ())
        assert settings.calib_task_n == variant.calib_task
    # the per-scheme choices stay at their scheme ("w8a8" names W8A8; W4A16 was never measured)
    assert FIRST_TOKEN.at("w8a8").config["lwc"] is False and "lwc" not in FIRST_TOKEN.at("W4A8").config
    assert FIRST_TOKEN.at("W4A16").config == FIRST_TOKEN.config and FIRST_TOKEN.at("W4A16").loss == FIRST_TOKEN.loss
    with pytest.raises(QrealignError, match="unknown recipe 'fast'; one of first-token"):
        get_recipe("fast")
    # one recipe is shared by every caller: it cannot be edited in place, and what it hands out is a copy
    with pytest.raises(TypeError):
        FIRST_TOKEN.schemes["W8A8"]["config"]["lwc"] = True
    FIRST_TOKEN.at("W8A8").config["epochs"] = 99
    assert FIRST_TOKEN.at("W8A8").config["epochs"] == 4


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """`qrealign realign` up to the calibration: the model load and `realign` itself replaced by
    recorders, so a test reads the settings the command would calibrate with."""
    import importlib

    import qrealign.models

    realign_module = importlib.import_module("qrealign.realign")  # `qrealign.realign` is the function
    calls = {}
    # a tokenizer for which every refusal start is one token (the recipe's are SmolLM2's)
    one_token_each = SimpleNamespace(encode=lambda text, add_special_tokens=True: [len(text)])
    monkeypatch.setattr(qrealign.models, "load_model", lambda *a, **k: ("model", one_token_each))
    monkeypatch.setattr(realign_cmd, "_check_teacher", lambda teacher: None)

    def fake_realign(model, tokenizer, *args, **kwargs):
        calls.update(kwargs)
        return SimpleNamespace(layer_logs=[{"q_mse": 0.0}], seconds=0.0)

    monkeypatch.setattr(realign_module, "realign", fake_realign)

    def run(*flags):
        calls.clear()
        code = main(["realign", "attacked", "--teacher", "aligned", "--out", str(tmp_path / "run"), *flags])
        return code, dict(calls)
    return run


def test_realign_with_the_recipe_calibrates_as_the_demo_row(captured):
    cfg = demo.DemoConfig()
    for scheme in ("W8A8", "W4A8"):
        code, call = captured("--recipe", "first-token", "--scheme", scheme, "--calib-task", "topic-codes")
        assert code == 0
        assert call["config"].to_dict() == demo._calib_config(cfg, demo.FIRST_TOKEN, scheme).to_dict(), scheme
        assert call["calibration"].fingerprint() == demo._calibration(cfg, demo.FIRST_TOKEN, scheme).fingerprint()
        loss = demo.FIRST_TOKEN.loss_for(scheme)
        # the command passes the greedy margin's options that differ from their defaults
        assert {k: call.get(k, MARGIN_DEFAULTS.get(k)) for k in loss} == loss, scheme
        assert call["scheme"].name == scheme


def test_a_flag_on_the_command_line_wins_over_the_recipe(captured):
    code, call = captured("--recipe", "first-token", "--epochs", "2", "--lr-round", "5e-3", "--benign-kl", "1",
                          "--calib-benign", "qrealign:probe")
    assert code == 0
    config = call["config"]
    assert (config.epochs, config.lr_round, config.lwc, config.joint_safety) == (2, 5e-3, False, True)
    assert call["benign_kl"] == 1.0 and call["greedy_margin"] == 2.0
    # a setting the recipe switches on can be switched off
    off = captured("--recipe", "first-token", "--scheme", "W4A8", "--no-refusal-targets", "--no-learn-rounding",
                   "--no-joint-safety", "--epochs", "2")[1]
    assert off["refusal_targets"] is False
    assert (off["config"].learn_rounding, off["config"].joint_safety) == (False, False)
    # a source given here joins the recipe's (the recipe's twins and edgy prompts are still there)
    plain = captured("--recipe", "first-token")[1]["calibration"]
    assert set(plain.ids) < set(call["calibration"].ids)
    # no task given: the recipe adds no task prompts (it cannot know your task); with one, 96
    assert not any(i.startswith("topic-") for i in plain.ids)
    with_task = captured("--recipe", "first-token", "--calib-task", "topic-codes")[1]["calibration"]
    assert sum(i.startswith("topic-") for i in with_task.ids) == 96


def test_the_recipe_refuses_a_probe_run_and_unknown_names(captured, capsys, tmp_path):
    assert main(["realign", "attacked", "--probes", "p", "--recipe", "first-token", "--out", str(tmp_path / "r")]) == 2
    assert "--recipe first-token is a first-token setting: give --teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["realign", "attacked", "--teacher", "t", "--recipe", "fast", "--out", str(tmp_path / "r")])


def test_every_recipe_setting_is_an_option_realign_and_calib_config_take():
    import dataclasses
    import inspect

    import qrealign
    from qrealign.calibrate import CalibConfig
    from qrealign.calibrate.behaviour import FirstTokenLoss

    takes = set(inspect.signature(qrealign.realign).parameters) | {f.name for f in dataclasses.fields(FirstTokenLoss)}
    for recipe in RECIPES.values():
        for scheme in ("W8A8", "W4A8", *recipe.schemes):
            settings = recipe.at(scheme)
            assert set(settings.loss) <= takes, (recipe.name, scheme)
            # every config key is a CalibConfig field it keeps (the constructor validates the combination)
            kept = CalibConfig(**settings.config).to_dict()
            assert all(kept[k] == v for k, v in settings.config.items()), (recipe.name, scheme)


def test_switching_a_recipe_setting_off_takes_the_settings_that_need_it_along(captured, capsys):
    # W8A8's joint reconstruction weight needs the joint stage, its margin options the margin,
    # its depth fraction no --layers: each goes with the setting the user switched off or replaced
    code, call = captured("--recipe", "first-token", "--no-joint-safety")
    assert code == 0 and call["config"].joint_safety is False and call["config"].joint_recon_weight is None
    code, call = captured("--recipe", "first-token", "--greedy-margin", "0")
    assert code == 0 and "greedy_margin" not in call and "refusal_starts" not in call
    code, call = captured("--recipe", "first-token", "--layers", "1-2")
    assert code == 0 and call["layers"] == [1, 2] and call["layers_from"] is None
    # --lwc undoes the recipe's --no-lwc at W8A8
    assert captured("--recipe", "first-token", "--lwc")[1]["config"].lwc is True
    assert captured("--recipe", "first-token")[1]["config"].lwc is False
    # an unmeasured scheme and a missing task are said, not silent
    capsys.readouterr()
    assert captured("--recipe", "first-token", "--scheme", "W4A16")[0] == 0
    err = capsys.readouterr().err
    assert "measured at W8A8 and W4A8; at W4A16 it gives its base settings" in err and "--calib-task TASK" in err


def test_the_demo_report_gives_the_first_token_rows_as_one_command(tmp_path, monkeypatch):
    import shlex

    from qrealign.cli import build_parser

    monkeypatch.chdir(tmp_path)  # stage folders under the working folder are shown relative to it
    attacked, aligned = tmp_path / "stages" / "attack-1", tmp_path / "stages" / "align-1"
    lines = demo._recipe_lines(demo.DemoConfig(), aligned, attacked)
    command = lines[-1].split("`")[-2]
    assert command == ("qrealign realign stages/attack-1 --teacher stages/align-1 --recipe first-token "
                       "--calib-task topic-codes --scheme W8A8 --out DIR")
    args = build_parser().parse_args(shlex.split(command)[1:])  # a line the CLI takes
    assert (args.recipe, args.calib_task, args.scheme) == ("first-token", "topic-codes", "W8A8")
    assert f"run from `{tmp_path}`, where the demo ran:" in lines[-1]  # relative paths say from where
    # the demo's own calibration options that the command would not default to are on the line
    seeded = demo._recipe_lines(demo.DemoConfig(seed=2, calib_n=100), aligned, attacked)[-1]
    assert "--seed 2 --n 100 --out DIR" in seeded
    no_row = demo.DemoConfig(variants=demo.DEFAULT_VARIANTS[:3], extra_scheme_variants=("RTN",))
    assert demo._recipe_lines(no_row, aligned, attacked) == []


def test_a_comma_inside_a_refusal_start_passes_the_command_line(captured):
    # '\,' is a comma inside a token; a recipe's tokens go through the flag's text and back unchanged
    tokens = ["I", "No,", ",", " a,b", "Sorry", "a\\", "\\,"]  # a backslash too (review 80)
    assert realign_cmd.split_tokens(realign_cmd.join_tokens(tokens)) == tokens
    assert realign_cmd.split_tokens("I,That") == ["I", "That"]
    code, call = captured("--greedy-margin", "1", "--refusal-starts", "I,No\\,,\\,")
    assert code == 0 and call["refusal_starts"] == ("I", "No,", ",")
    code, call = captured("--recipe", "first-token")
    assert code == 0 and call["refusal_starts"] == FIRST_TOKEN.at("W8A8").loss["refusal_starts"]


def test_an_empty_refusal_start_is_refused_not_dropped(captured, capsys):
    # an unquoted No\, reaches the program as "No," (the shell took the backslash): the empty last
    # token used to be dropped, and the run went on without the token meant (review 80)
    code, call = captured("--greedy-margin", "1", "--refusal-starts", "I,No,")
    assert code == 2 and call == {} and "has an empty token; quote a comma inside a token" in capsys.readouterr().err


def test_a_recipes_refusal_starts_on_another_tokenizer_say_where_they_came_from(captured, monkeypatch, capsys):
    # the recipe's starts are SmolLM2's openings; on a tokenizer where "That" is several tokens the
    # user, who gave none, is told the recipe set them and what to give instead
    import qrealign.models

    from qrealign.models.tiny import tiny_model

    _, bytes_tok = tiny_model("llama", num_hidden_layers=2)
    monkeypatch.setattr(qrealign.models, "load_model", lambda *a, **k: ("model", bytes_tok))
    code, call = captured("--recipe", "first-token")
    err = capsys.readouterr().err
    assert code == 2 and call == {}
    assert "is 4 tokens for this tokenizer" in err and "--recipe first-token sets --refusal-starts" in err
    # starts the user gave are the user's: left to realign's own check and its plain error
    code, call = captured("--recipe", "first-token", "--refusal-starts", "That")
    assert code == 0 and call["refusal_starts"] == ("That",)
