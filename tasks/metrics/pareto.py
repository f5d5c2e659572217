"""Pareto front of compression recipes: latency (lower is better) against mAP (higher is better).

A recipe is on the front when no other recipe is at least as good on both axes and strictly
better on one (it is *non-dominated*). The front is computed by sorting by latency and keeping
each point that beats the best mAP seen so far: O(n log n) for two objectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def dominates(a: dict, b: dict, x: str, y: str) -> bool:
    """`a` is at least as fast and as accurate as `b`, and strictly better on one axis."""
    return a[x] <= b[x] and a[y] >= b[y] and (a[x] < b[x] or a[y] > b[y])


def pareto_front(points: Sequence[dict], x: str = "latency_ms_p50", y: str = "map50") -> list[dict]:
    """The non-dominated points (minimise `x`, maximise `y`), sorted by `x`.

    Points with equal (x, y) are all kept (neither dominates the other).
    """
    front: list[dict] = []
    best_y = float("-inf")
    # fastest first; among equally fast, the most accurate first
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best_y:
            front.append(p)
            best_y = p[y]
        elif front and p[x] == front[-1][x] and p[y] == front[-1][y]:
            front.append(p)  # a tie with the last front point
    return front


def markdown(rows: Sequence[dict], columns: dict[str, str], title: str) -> str:
    """A Markdown table of `rows` with the given {key: heading} columns."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = [f"# {title}", "", "| " + " | ".join(columns.values()) + " |"]
    lines.append("|" + " --- |" * len(columns))
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(
    points: Sequence[dict], front: Sequence[dict], path: Path, x: str, y: str, label: str
) -> Path:
    """Scatter of every recipe with the front drawn as a step line; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[x] for p in points], [p[y] for p in points], color="0.6", label="recipe")
    ax.step([p[x] for p in front], [p[y] for p in front], "o-", where="post", label="Pareto front")
    for p in points:
        ax.annotate(
            str(p[label]), (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
