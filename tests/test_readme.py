"""The README's examples that need no model run as written (a copied example that raises is the
first thing a new user meets)."""
import ast
import re
from pathlib import Path

from qrealign.calibrate.data import CalibrationSet, build_calibration

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_calibration_examples_build():
    calls = []
    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "build_calibration"):
                calls.append(ast.Expression(node))
    assert len(calls) >= 2, "the README's calibration examples moved; update this test"
    from qrealign.recipes import get_recipe

    for expr in calls:
        for scheme in ("W8A8", "W4A8"):  # `s`: the README's recipe settings at each scheme
            names = {"build_calibration": build_calibration, "s": get_recipe("first-token").at(scheme)}
            calib = eval(compile(expr, "README.md", "eval"), names)
            assert isinstance(calib, CalibrationSet) and len(calib.prompts) > 0


def test_readme_python_calls_match_the_signatures():
    """Every call the README's Python shows binds to the function's real signature: a renamed or
    dropped argument fails here, not in a user's first session. (Running the snippet needs real
    models: its refusal targets need a teacher that refuses.)"""
    import inspect

    import qrealign
    from qrealign.calibrate import CalibConfig, load_quantized
    from qrealign.calibrate.api import quantize

    functions = {"realign": qrealign.realign, "load_model": qrealign.load_model, "CalibConfig": CalibConfig,
                 "load_quantized": load_quantized, "build_calibration": build_calibration, "quantize": quantize}
    import dataclasses

    from qrealign.calibrate.behaviour import FirstTokenLoss
    from qrealign.calibrate.safety import SafetyLoss

    loss_fields = {f.name for cls in (FirstTokenLoss, SafetyLoss) for f in dataclasses.fields(cls)} | {"layers_from"}
    seen = set()
    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in functions:
                continue
            seen.add(name)
            args = [None] * len(node.args)
            kwargs = {k.arg: None for k in node.keywords if k.arg is not None}  # not a `**settings`
            signature = inspect.signature(functions[name])
            signature.bind(*args, **kwargs)  # raises TypeError on a mismatch
            if name == "realign":  # its **loss_options go to the loss: they must be its fields
                extra = set(kwargs) - set(signature.parameters)
                assert extra <= loss_fields, f"realign(..., {sorted(extra - loss_fields)}) is no loss option"
    assert {"realign", "load_model", "CalibConfig", "load_quantized", "build_calibration"} <= seen


def test_readme_command_lines_parse():
    """Every full `qrealign ...` command the README and docs/scale.md show (one with its `--out`;
    shorter mentions in the prose are not commands) parses with today's CLI: a renamed flag or a
    dropped choice fails here, and quantize/realign lines also pass the flag rules checked before a
    model loads (a recipe's defaults applied); `a|b` is tried with each choice, and `[optional]`
    parts are left out."""
    import contextlib
    import io
    import shlex

    from qrealign.cli import build_parser

    text = README.read_text(encoding="utf-8") + (README.parent / "docs" / "scale.md").read_text(encoding="utf-8")
    lines = re.findall(r"`(qrealign [^`]+)`", text)
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.split("#")[0] for line in block.replace("\\\n", " ").splitlines()]
    commands = []
    for line in lines:
        line = " ".join(re.sub(r"\[[^\]]*\]", " ", line.replace("\\|", "|")).split())  # [optional] parts left out
        if not line.startswith("qrealign ") or "--out" not in line or any(m in line for m in ("...", "…")):
            continue
        words = line.split(" ")
        choices = next(((i, w.split("|")) for i, w in enumerate(words) if "|" in w), None)
        if choices is None:
            commands.append(line)
        else:  # `--method rtn|omniquant`: each choice
            i, options = choices
            commands += [" ".join([*words[:i], option, *words[i + 1:]]) for option in options]
    from qrealign.cli import _with_command_defaults
    from qrealign.cli._calib_args import check_flags

    for command in commands:
        errors = io.StringIO()
        argv = shlex.split(command)[1:]
        parser = build_parser()  # one per command line, as in a process (a recipe sets its defaults)
        try:
            with contextlib.redirect_stderr(errors):
                args = _with_command_defaults(parser, parser.parse_args(argv), argv)
        except SystemExit:
            raise AssertionError(f"README: `{command}` does not parse: {errors.getvalue().strip()}") from None
        if args.command in ("quantize", "realign"):  # and passes the flag rules checked before the load
            check_flags(args, getattr(args, "method", "omniquant"))
    assert len(commands) >= 15 and any("--method omniquant" in c for c in commands) \
        and any("--target refusal-direction" in c for c in commands), \
        "the README's commands moved; update this test"
