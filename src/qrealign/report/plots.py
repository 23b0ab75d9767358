"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .table import category_table, comparison_rows


def row_style(j: int) -> tuple[str, str | None]:
    """Colour and hatch of row j: matplotlib's ten colours, then the same ten hatched, so rows 10
    and up never share a legend entry's look with an earlier row (review 68)."""
    return f"C{j % 10}", (None if j < 10 else ("//", "..", "xx")[(j // 10 - 1) % 3])


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _scatter(rows: list[dict], x_key: str, x_label: str, title: str, path: Path) -> Path | None:
    pts = [r for r in rows if r["hs"] is not None and r[x_key] is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    for i, r in enumerate(pts):
        ax.scatter(r[x_key], r["hs"], s=60, color=row_style(i)[0], zorder=3)
        if r.get("hs_ci"):
            ax.vlines(r[x_key], r["hs_ci"][0], r["hs_ci"][1], color=row_style(i)[0], alpha=0.4, lw=2)
        dx, dy, ha = _label_side(r, pts, x_key)
        ax.annotate(r["model"], (r[x_key], r["hs"]), textcoords="offset points", fontsize=9,
                    xytext=(dx, dy), ha=ha)
    ax.set_xlabel(x_label)
    ax.set_ylabel("Harmful score HS (%)  ↓")
    ax.set_title(title)
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_side(r: dict, pts: list[dict], x_key: str) -> tuple[int, int, str]:
    """Put the label on the side (of four) farthest from the other points and their CI bars, so
    close points (typically aligned vs. realigned) stay readable. Axes are both 0-100 %, so data
    units are comparable; a label is roughly 1.3 % of the axis per character wide."""
    width = 1.3 * len(r["model"])
    others = [(o[x_key], y) for o in pts if o is not r
              for y in ([o["hs"]] + (list(o["hs_ci"]) if o.get("hs_ci") else []))]
    best, best_d = (7, 6, "left"), -1.0
    for dx, dy, ha in ((7, 6, "left"), (7, -13, "left"), (-7, 6, "right"), (-7, -13, "right")):
        cx = r[x_key] + (width / 2 if ha == "left" else -width / 2)
        cy = r["hs"] + (3 if dy > 0 else -3)
        d = min(((cx - x) ** 2 / (width / 2 + 1) ** 2 + (cy - y) ** 2 / 9 for x, y in others), default=1e9)
        if r[x_key] + (width if ha == "left" else -width) > 105 or r[x_key] - (width if ha == "right" else 0) < -5:
            d -= 100  # would run off the axes
        if d > best_d:
            best, best_d = (dx, dy, ha), d
    return best


def hs_vs_fa(results: Sequence, path: Path) -> Path | None:
    """HS against task accuracy (the paper's trade-off); None when no result has an FA."""
    return _scatter(comparison_rows(results), "fa", "Task accuracy FA (%)  ↑", "Safety vs. utility (bars: 95% CI)", path)


def hs_vs_over_refusal(results: Sequence, path: Path) -> Path | None:
    """HS against over-refusal: recovering refusals must not mean refusing everything."""
    return _scatter(comparison_rows(results), "over_refusal", "Over-refusal on benign prompts (%)  ↓",
                    "Harmful compliance vs. over-refusal (bars: 95% CI)", path)


def per_category(results: Sequence, path: Path) -> Path | None:
    cats, names, cells = category_table(results)
    if not cats:
        return None
    plt = _plt()
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(cats) + 2), 4.8), dpi=110)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cats))]
        hs = [(cells.get((c, name)) or {}).get("hs") for c in cats]
        color, hatch = row_style(j)
        # no value is no bar, not a 0 % one that reads as "perfectly safe" (review 68); the table says "–"
        ax.bar(xs, [h if h is not None else float("nan") for h in hs], width=width, label=name, color=color,
               hatch=hatch)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right")
    ax.set_ylabel("Harmful score HS (%)  ↓")
    ax.set_ylim(0, 118)  # headroom so the legend never covers a bar at 100 %
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("Harmful score per category")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(names), 4), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
