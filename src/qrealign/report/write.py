"""`write_report(results, out_dir)`: report.md, report.html (self-contained) and plots/*.png."""

from __future__ import annotations

import base64
import copy
import html
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..errors import QrealignError
from . import plots
from .table import COLUMNS, comparison_rows, format_row, markdown_category_table, markdown_table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #d0d0d5;padding:.3rem .6rem}
th{background:#f3f3f6;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:.85rem}img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
details{margin:.4rem 0}pre{white-space:pre-wrap;background:#f7f7f9;padding:.4rem;border-radius:4px;font-size:.82rem}
.warn{color:#a15c00}
"""

_NOTE = ("HS: % of harmful prompts whose response the judge counts as harmful (keyword judge: answered, not "
         "refused, not degenerate). Over-refusal: % of benign prompts refused. Degenerate benign: % of benign "
         "prompts answered with empty, looping or gibberish text (lost help that over-refusal does not count). "
         "Degenerate: the same over all responses. FA: task accuracy. CI: Wilson 95 % interval on HS. "
         "Unjudged (counted beside n): answers left out of the rates, in another language than the keyword "
         "judge's English or unparseable by a model judge.")


def check_report_out(out_dir: str | Path) -> None:
    """A report replaces its directory, and every `qrealign eval` output holds a report.md too:
    refuse a directory that holds an evaluation (its result.json), not only foreign ones."""
    from ..utils import check_out_dir

    out = Path(out_dir)
    if (out / "result.json").exists():
        raise QrealignError(f"--out {out} holds an evaluation (result.json) that a report would replace; "
                            "choose a new directory")
    check_out_dir(out, "report.md", what="an earlier report")


def distinct_names(results: Sequence) -> list:
    """`results` with a repeated name told apart in tables and legends ("name #2"), as copies: the
    caller's objects keep their names."""
    results = list(results)
    names = [r.name for r in results]
    if len(set(names)) == len(names):
        return results
    results = [copy.copy(r) for r in results]
    for i, r in enumerate(results):
        if names.count(r.name) > 1:
            r.name = f"{r.name} #{i + 1}"
    return results


def write_report(results: Sequence, out_dir: str | Path, title: str = "qrealign evaluation report",
                 verdict: Sequence[str] = (), stages: Sequence[str] = ()) -> Path:
    """Write report.md, report.html and plots/*.png for `results` (EvalResult objects) into
    `out_dir` (created if needed; files inside are replaced). `verdict`: Markdown lines (e.g.
    `report.verdict.verdict_lines`) shown under the table; `stages`: Markdown lines on the stages
    behind the rows (e.g. `stages.stage_code_lines`), shown last. Returns out_dir."""
    results = list(results)
    if not results:
        raise QrealignError("no results to report")
    results = distinct_names(results)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    made = {
        "hs_vs_fa": plots.hs_vs_fa(results, out / "plots" / "hs_vs_fa.png"),
        "hs_vs_over_refusal": plots.hs_vs_over_refusal(results, out / "plots" / "hs_vs_over_refusal.png"),
        "per_category": plots.per_category(results, out / "plots" / "per_category_hs.png"),
    }
    made = {k: v for k, v in made.items() if v is not None}
    (out / "report.md").write_text(_markdown(results, title, made, out, verdict, stages), encoding="utf-8")
    (out / "report.html").write_text(_html(results, title, made, verdict, stages), encoding="utf-8")
    return out


def _settings_lines(results) -> list[str]:
    lines = []
    for r in results:
        g = (r.settings or {}).get("generation", {})
        lines.append(f"- **{r.name}**: model `{r.model.get('source')}` (fingerprint `{r.model.get('fingerprint')}`"
                     f"{', ' + r.model['kind'] if r.model.get('kind') else ''}); harmful `{r.settings.get('harmful')}`, "
                     f"benign `{r.settings.get('benign')}`; judge `{r.judge.get('name')}`; "
                     f"{'sampling' if g.get('do_sample') else 'greedy'}, {g.get('max_new_tokens')} new tokens; "
                     f"{r.wall_time_s:.0f} s")
        if r.overlap and not r.overlap.get("clean", True):
            lines.append(f"  - ⚠ {r.overlap.get('total')} evaluation prompts overlap training/calibration prompts "
                         f"(forced): {', '.join(r.overlap.get('by_stage', {}))}")
    return lines


def comparability(results, facets: Sequence[str] | None = None) -> list[str]:
    """What differs between the rows' evaluations (prompt sets, their contents and sizes, generation,
    judge, task, its split and size): rows measured differently are not one table's comparison, and
    the report says so above the table instead of ranking them silently. `facets`: only these."""
    def s(r):
        return r.settings or {}

    def g(r):
        return s(r).get("generation", {}) or {}

    every = {
        "harmful prompts": lambda r: (s(r).get("harmful"), r.metrics.get("n_harmful"), s(r).get("harmful_fingerprint")),
        "benign prompts": lambda r: (s(r).get("benign"), r.metrics.get("n_benign"), s(r).get("benign_fingerprint")),
        "generation": lambda r: (g(r).get("max_new_tokens"), bool(g(r).get("do_sample")), g(r).get("system"),
                                 g(r).get("backend", "hf"), bool(g(r).get("drop_finished"))),
        "judge": lambda r: ((r.judge or {}).get("name"), (r.judge or {}).get("source")),
        "task": lambda r: (s(r).get("task"), s(r).get("task_split"), r.metrics.get("task_n")),
    }
    out = []
    for facet in facets or every:
        seen = {}
        for r in results:
            seen.setdefault(repr(every[facet](r)), []).append(r.name)
        if len(seen) > 1:
            out.append(f"{facet} differ: " + "; ".join(f"{', '.join(names)}: {k}" for k, names in seen.items()))
    return out


def _markdown(results, title, made, out, verdict=(), stages=()) -> str:
    parts = [f"# {title}", "", f"_Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by qrealign._", ""]
    differ = comparability(results)
    if differ:
        parts += ["**⚠ These rows were not evaluated alike**, so their differences are not the models' alone:", "",
                  *[f"- {d}" for d in differ], ""]
    parts += [markdown_table(results), "", _NOTE, ""]
    if verdict:
        parts += ["## Verdict", "", *verdict, ""]
    cat = markdown_category_table(results)
    if cat:
        parts += ["## Harmful score per category", "", cat, ""]
    if made:
        parts += ["## Plots", ""] + [f"![{k}]({Path(p).relative_to(out).as_posix()})" for k, p in made.items()] + [""]
    parts += ["## Settings", "", *_settings_lines(results), ""]
    if stages:
        parts += ["## Stages", "", *stages, ""]
    return "\n".join(parts)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _markdown_list_html(lines, heading: str) -> str:
    """A section (the verdict, the stages) in the small Markdown subset its lines use: '- ' items
    (indented ones nested one level under the item before), **bold** and `code`."""
    out, items = [], []  # items: [text, [nested texts]]
    for line in [*lines, ""]:
        nested = line.startswith(" ") and line.lstrip().startswith("- ")
        line = line.lstrip() if line.lstrip().startswith("- ") else line
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line[2:] if line.startswith("- ") else line))
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
        if nested and items:
            items[-1][1].append(text)
            continue
        if line.startswith("- "):
            items.append([text, []])
            continue
        if items:
            out.append("<ul>" + "".join(f"<li>{t}" + ("<ul>" + "".join(f"<li>{n}</li>" for n in sub) + "</ul>"
                                                         if sub else "") + "</li>" for t, sub in items) + "</ul>")
            items = []
        if line.strip():
            out.append(f"<p>{text}</p>")
    return f"<h2>{html.escape(heading)}</h2>" + "".join(out)


def _html(results, title, made, verdict=(), stages=()) -> str:
    e = html.escape
    head = "".join(f"<th>{e(t)}</th>" for _, t in COLUMNS)
    body = []
    for row in comparison_rows(results):
        f = format_row(row)
        cells = "".join(f'<td{"" if k in ("model", "judge") else " class=num"}>{e(f[k])}</td>' for k, _ in COLUMNS)
        body.append(f"<tr>{cells}</tr>")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1>",
             f"<p class=note>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by qrealign.</p>",
             f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
             f"<p class=note>{e(_NOTE)}</p>"]
    if verdict:
        parts.append(_markdown_list_html(verdict, "Verdict"))
    cat_md = markdown_category_table(results)
    if cat_md:
        lines = [ln.strip("|").split("|") for ln in cat_md.splitlines()]
        rows = [lines[0]] + lines[2:]
        tbl = "".join("<tr>" + "".join((f"<th>{e(c.strip())}</th>" if i == 0 else
                                        f"<td{'' if j == 0 else ' class=num'}>{e(c.strip())}</td>")
                                       for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
        parts.append(f"<h2>Harmful score per category</h2><table>{tbl}</table>")
    if made:
        parts.append("<h2>Plots</h2>" + "".join(_img(p) for p in made.values()))
    parts.append("<h2>Settings</h2><ul>" + "".join(f"<li>{e(ln.lstrip('- '))}</li>" for ln in _settings_lines(results))
                 + "</ul>")
    if stages:
        parts.append(_markdown_list_html(stages, "Stages"))
    parts.append("<h2>Sample responses</h2><p class=note>First harmful prompts answered (judged harmful), "
                 "first benign prompts refused and first answers left unjudged, per model, to audit the judge.</p>")
    for r in results:
        parts.append(f"<details><summary>{e(r.name)}</summary>")
        for side, want, label in (("harmful", "harmful", "answered harmful"), ("benign", "refused", "refused benign"),
                                  (None, "unjudged", "unjudged")):
            picked = [x for x in r.records if side in (None, x["side"]) and x["verdict"].get(want)][:5]
            for x in picked:
                parts.append(f"<p><b>{e(label)}</b> [{e(x['id'])}] {e(x['prompt'])}</p><pre>{e(x['response'])}</pre>"
                             f"<p class=note>{e(x['verdict'].get('reason', ''))}</p>")
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
