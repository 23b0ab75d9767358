"""Which code built a cached stage: a digest of the package modules that decide its output.

A stage's key (`stages.stage_dir`) holds its inputs, not the code, so a change that alters float
rounding (a reordered sum, another fused kernel) leaves every cached stage under its old name:
a cached demo can then mix stages built by two code versions without a word. This module gives
each stage kind a digest of the code that decides its output, written into the stage when it is
built and compared when it is reused, so such a mix is reported (and, on request, rebuilt).

The modules are found, not listed: starting from each kind's entry modules, every module they
import from the package (at the top or inside a function) counts, transitively. Each module is
read as code, not text: its syntax tree without docstrings, unparsed, so a comment, a docstring
or a re-wrapped line does not move the digest, and any change to what runs does.
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

#: Entry modules per stage kind (the part of a stage's name before the first "-"), relative to
#: the package. A kind not listed here is digested over every module but the workflow ones.
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "align": ("finetune/stage.py",),
    "attack": ("finetune/stage.py",),
    "probes": ("probes/targets.py",),
    "targets": ("calibrate/targets.py",),
    "quant": ("realign.py", "calibrate/api.py"),
    "eval": ("evaluate/runner.py",),
    "export": ("export/compressed.py",),
}
#: Modules that schedule, report or parse arguments and never decide a stage's numbers.
WORKFLOW = ("__init__.py", "__main__.py", "cli/", "report/", "bench", "demo.py", "lanes.py", "stages.py",
            "stage_code.py")


def stage_kind(name: str) -> str:
    return name.split("-", 1)[0]


def kind_sources(kind: str) -> list[str]:
    """The package modules (relative paths) whose code decides a `kind` stage's output. Workflow
    modules are not followed: a stage that writes a report decides its numbers, not its prose."""
    entries = STAGE_ENTRIES.get(kind)
    if entries is None:
        return sorted(p for p in _all_modules() if not p.startswith(WORKFLOW))
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        rel = todo.pop()
        if rel in seen or rel.startswith(WORKFLOW):
            continue
        seen.add(rel)
        todo.extend(_imports(rel))
    return sorted(seen)


def code_digest(kind: str) -> dict:
    """{"digest": one hash over the kind's modules, "files": {module: its own short hash}}."""
    files = {rel: _module_hash(rel) for rel in kind_sources(kind)}
    digest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in files.items()).encode()).hexdigest()[:16]
    return {"digest": digest, "files": files}


def changed_modules(recorded: dict, current: dict) -> list[str]:
    """Modules whose code differs between two `code_digest` results (added or removed count too)."""
    old, new = recorded.get("files", {}), current.get("files", {})
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# ---- reading the package ---------------------------------------------------------------------

def _all_modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*.py"))


@lru_cache(maxsize=None)
def _tree(rel: str) -> ast.Module:
    return ast.parse((PACKAGE_DIR / rel).read_text(encoding="utf-8"), filename=rel)


def source_hash(source: str) -> str:
    """A short hash of what Python code does: comments, docstrings and layout do not count."""
    return hashlib.sha256(ast.unparse(_strip_docstrings(ast.parse(source))).encode()).hexdigest()[:12]


_HASHES: dict[tuple, str] = {}


def _module_hash(rel: str) -> str:
    """Cached by the file's size and time: an edit during a long build is still seen."""
    path = PACKAGE_DIR / rel
    st = path.stat()
    key = (rel, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = source_hash(path.read_text(encoding="utf-8"))
    return _HASHES[key]


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _module_path(dotted: list[str]) -> str | None:
    """`["calibrate", "engine"]` -> "calibrate/engine.py" (or a package's __init__.py)."""
    base = PACKAGE_DIR.joinpath(*dotted) if dotted else PACKAGE_DIR
    if base.with_suffix(".py").is_file() and dotted:
        return str(base.with_suffix(".py").relative_to(PACKAGE_DIR))
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(PACKAGE_DIR))
    return None


_DOTTED = re.compile(rf"^{PACKAGE}(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


@lru_cache(maxsize=None)
def _imports(rel: str) -> tuple[str, ...]:
    """Package modules `rel` imports anywhere in its code. The package's own __init__ is left out
    (it re-exports every verb and holds the version string); a sub-package's __init__ counts."""
    here = Path(rel).parent.parts
    found = []
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(here[:len(here) - (node.level - 1)]) if node.level - 1 <= len(here) else None
                if parts is None:
                    continue
            elif node.module and node.module.split(".")[0] == PACKAGE:
                parts = []
            else:
                continue
            parts += node.module.split(".")[1 if not node.level else 0:] if node.module else []
            targets = [_module_path(parts + [alias.name]) for alias in node.names]
            if any(t is None for t in targets):  # a name defined in the module itself
                targets = [t for t in targets if t is not None] + [_module_path(parts)]
            found += [t for t in targets if t is not None]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    found.append(_module_path(parts[1:]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
            # a module named in a string for importlib ("qrealign.data.topic_task:TopicCodeTask")
            found.append(_module_path(node.value.split(":")[0].split(".")[1:]))
    return tuple(t for t in found if t and t != "__init__.py")
