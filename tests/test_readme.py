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
    for expr in calls:
        calib = eval(compile(expr, "README.md", "eval"), {"build_calibration": build_calibration})
        assert isinstance(calib, CalibrationSet) and len(calib.prompts) > 0
