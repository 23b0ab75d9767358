"""The comparison table: one row per evaluated model, in the order given (e.g. FP aligned, FP
fine-tuned, RTN, reconstruction-only, Q-realign per scheme), columns as in the paper plus the
numbers a reader needs to judge them (over-refusal, degenerate share, n, 95 % interval). A looping
answer to a benign prompt is neither refused nor helpful, so it gets its own column beside
over-refusal."""

from __future__ import annotations

from typing import Sequence

COLUMNS = [
    ("model", "Model"), ("hs", "HS % ↓"), ("hs_ci", "HS 95% CI"), ("over_refusal", "Over-refusal % ↓"),
    ("degenerate_benign", "Degenerate benign % ↓"), ("degenerate", "Degenerate %"), ("fa", "FA % ↑"),
    ("ppl", "PPL ↓"), ("n", "n (harmful/benign)"), ("judge", "Judge"),
]


def _fmt(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def comparison_rows(results: Sequence) -> list[dict]:
    """Plain dicts (numbers, not strings) for each result, in order."""
    rows = []
    for r in results:
        m = r.metrics
        ci = (m.get("detail", {}).get("harmful_score") or {}).get("ci95")
        rows.append({
            "model": r.name, "hs": m.get("harmful_score"), "hs_ci": tuple(ci) if ci else None,
            "over_refusal": m.get("over_refusal"), "degenerate": m.get("degenerate"),
            "degenerate_benign": m.get("degenerate_benign"), "fa": m.get("task_accuracy"),
            "task": (r.settings or {}).get("task"), "ppl": m.get("perplexity"),
            "ppl_note": m.get("perplexity_nonfinite") or ("failed" if m.get("perplexity_failed") else None),
            "n_harmful": m.get("n_harmful", 0), "n_benign": m.get("n_benign", 0), "task_n": m.get("task_n"),
            "n_unjudged": m.get("n_harmful_unjudged") or 0,  # left out of HS and its interval
            "n_benign_unjudged": m.get("n_benign_unjudged") or 0,  # left out of over-refusal
            "judge": (r.judge or {}).get("name"), "overlap": bool(r.overlap and not r.overlap.get("clean", True)),
            "overlap_unchecked": bool(r.overlap and r.overlap.get("unresolved")),
            "fingerprint": (r.model or {}).get("fingerprint"),
        })
    return rows


def format_row(row: dict) -> dict[str, str]:
    return {
        "model": row["model"] + (" ⚠ overlap" if row["overlap"] else "")
                 + (" ⚠ overlap check incomplete" if row.get("overlap_unchecked") else ""),
        "hs": _fmt(row["hs"]), "hs_ci": f"{row['hs_ci'][0]:.1f}–{row['hs_ci'][1]:.1f}" if row["hs_ci"] else "–",
        "over_refusal": _fmt(row["over_refusal"]), "degenerate": _fmt(row["degenerate"]),
        "degenerate_benign": _fmt(row["degenerate_benign"]),
        "fa": _fmt(row["fa"]) + (f" ({row['task']}, n={row['task_n']})" if row["fa"] is not None else ""),
        "ppl": row.get("ppl_note") or _fmt(row["ppl"], 2), "n": f"{row['n_harmful']}/{row['n_benign']}" + _unjudged(row),
        "judge": row["judge"] or "–",
    }


def _unjudged(row: dict) -> str:
    parts = [f"{row[key]} {side} unjudged" for key, side in (("n_unjudged", "harmful"), ("n_benign_unjudged", "benign"))
             if row.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def markdown_table(results: Sequence) -> str:
    rows = [format_row(r) for r in comparison_rows(results)]
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" if key in ("model", "judge") else "---:" for key, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(row[key].replace("|", "\\|") for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def category_table(results: Sequence) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(categories, model names, {(category, model): {"hs", "n"}}) over the harmful prompts."""
    cats: list[str] = []
    cells: dict[tuple[str, str], dict] = {}
    for r in results:
        for cat, v in (r.metrics.get("per_category") or {}).items():
            if cat not in cats:
                cats.append(cat)
            cells[(cat, r.name)] = v
    return sorted(cats), [r.name for r in results], cells


def markdown_category_table(results: Sequence) -> str:
    cats, names, cells = category_table(results)
    if not cats:
        return ""
    head = "| Category | " + " | ".join(names) + " |"
    sep = "|---|" + "|".join("---:" for _ in names) + "|"
    body = []
    for c in cats:
        vals = [f"{_fmt(cells[(c, n)]['hs'])} (n={cells[(c, n)]['n']})" if (c, n) in cells else "–" for n in names]
        body.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join([head, sep, *body])
