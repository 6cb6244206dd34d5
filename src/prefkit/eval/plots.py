"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["reliability_diagram", "reward_length_scatter", "step_score_histogram", "style_grid_heatmap", "subset_bars"]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(calibration: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with bin counts."""
    bins = calibration["bins"]
    fig, ax = plt.subplots(figsize=(5, 5))
    width = bins[0]["upper"] - bins[0]["lower"]
    for b in bins:
        if not b["count"]:
            continue
        ax.bar(b["lower"], b["accuracy"], width=width, align="edge", color="tab:blue", edgecolor="black", alpha=0.8)
        ax.text(b["lower"] + width / 2, b["accuracy"] + 0.01, str(b["count"]), ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="predicted P(first preferred)", ylabel="observed frequency")
    ax.set_title(f"Reliability diagram (ECE = {calibration['ece']:.3f}, n = {calibration['n']})")
    ax.legend(loc="lower right")
    return _save(fig, path)


def reward_length_scatter(items: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Reward against response length (tokens), chosen and rejected responses in two colours."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
        x = [it[f"{side}_length"] for it in items]
        y = [it[f"{side}_reward"] for it in items]
        ax.scatter(x, y, s=10, alpha=0.6, color=color, label=side)
    ax.set(xlabel="response length (tokens)", ylabel="reward", title="Reward vs response length")
    ax.legend()
    return _save(fig, path)


def subset_bars(subsets: Mapping[str, Mapping[str, Any]], path: str | Path, label: str = "accuracy") -> Path:
    """One bar per subset (its ``accuracy``), with the count under the name."""
    names = list(subsets)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 2), 4))
    ax.bar(range(len(names)), [subsets[n]["accuracy"] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), [f"{n}\n(n={subsets[n]['n']})" for n in names], rotation=30, ha="right")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set(ylim=(0, 1), ylabel=label, title=f"{label} per subset")
    return _save(fig, path)


def style_grid_heatmap(
    matrix: Sequence[Sequence[float]], path: str | Path, styles: Sequence[str] | None = None
) -> Path:
    """The RM-Bench accuracy matrix: rows are chosen styles, columns rejected styles."""
    n = len(matrix)
    styles = list(styles) if styles is not None and len(styles) == n else [f"style {i + 1}" for i in range(n)]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "k")
    ax.set_xticks(range(n), styles, rotation=30, ha="right")
    ax.set_yticks(range(n), styles)
    ax.set(xlabel="rejected style", ylabel="chosen style", title="Accuracy by style (upper right = hard)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def step_score_histogram(items: Sequence[Mapping[str, Any]], threshold: float, path: str | Path) -> Path:
    """Histograms of a PRM's step probabilities for correct and for wrong steps, with the threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for correct, color, name in ((True, "tab:green", "correct steps"), (False, "tab:red", "wrong steps")):
        values = [p for it in items for p, y in zip(it["probabilities"], it["labels"]) if (float(y) > 0.5) == correct]
        if values:
            ax.hist(values, bins=20, range=(0, 1), alpha=0.6, color=color, label=f"{name} (n={len(values)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    ax.set(xlabel="P(step is correct)", ylabel="steps", title="PRM step probabilities")
    ax.legend()
    return _save(fig, path)
