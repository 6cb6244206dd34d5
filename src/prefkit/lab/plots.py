"""PNG plots of lab runs (matplotlib, Agg backend): training curves and true reward against KL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["reward_vs_kl", "training_curves"]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# y-axis labels of the metrics trainers log
METRIC_LABELS = {
    "loss": "training loss",
    "rewards/accuracies": "pairwise accuracy",
    "rewards/margins": "reward(chosen) - reward(rejected)",
}


def training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    metrics: Sequence[str],
    path: str | Path,
    *,
    per_run: Sequence[str] = (),
    ylabels: Mapping[str, str] | None = None,
) -> Path:
    """One panel per metric; in each, the metric against the step for every run (``runs[name]`` is a
    Trainer ``log_history``: entries without the metric are skipped), and its held-out value
    (``eval_<metric>``, dashed) where the run logged one. A metric in ``per_run`` gets one panel per run
    instead (values on different scales, e.g. a policy's implicit-reward margins and a reward model's
    margins). ``ylabels``: axis label per metric, or per ``"metric|run"`` for ``per_run`` panels."""
    labels = {**METRIC_LABELS, **(ylabels or {})}
    panels: list[tuple[str, list[tuple[int, str]]]] = []
    for metric in metrics:
        if metric in per_run:
            panels += [(metric, [(i, name)]) for i, name in enumerate(runs)]
        else:
            panels.append((metric, list(enumerate(runs))))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (metric, members) in zip(axes[0], panels):
        for i, name in members:
            history = runs[name]
            for key, label, style in ((metric, name, "-"), (f"eval_{metric}", f"{name}, held-out", "--")):
                points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i}", marker=".", label=label)
        own = len(members) == 1 and metric in per_run
        title = f"{metric} ({members[0][1]})" if own else metric
        ylabel = labels.get(f"{metric}|{members[0][1]}") if own else None
        ax.set(xlabel="step", ylabel=ylabel or labels.get(metric, metric), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def reward_vs_kl(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str = "True reward against KL to the reference",
    ylabel: str = "mean true reward",
    reference_reward: float | None = None,
) -> Path:
    """Reward (y) against KL in nats (x) for each series: ``series[name] = {"kl": [...], "reward": [...]}``
    with optional ``"reward_se"`` (error bars) and ``"labels"`` (a text beside each point)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, s in series.items():
        ax.errorbar(s["kl"], s["reward"], yerr=s.get("reward_se"), marker="o", markersize=4, capsize=2, label=name)
        for x, y, text in zip(s["kl"], s["reward"], s.get("labels", ())):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference_reward is not None:
        ax.axhline(reference_reward, color="gray", linestyle="--", linewidth=1, label="reference policy")
    ax.set(xlabel="KL(policy || reference), nats", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def labelled_scatter(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str = "reference policy",
    log_x: bool = False,
) -> Path:
    """One labelled point per entry: ``{"x", "y", "label"}`` with optional ``"yerr"`` and ``"xerr"``
    (error bars); ``hline`` draws a dashed horizontal line; ``log_x`` a symmetric-log x axis."""
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    for p in points:
        ax.errorbar(p["x"], p["y"], xerr=p.get("xerr"), yerr=p.get("yerr"), fmt="o", markersize=4, capsize=2)
        ax.annotate(str(p["label"]), (p["x"], p["y"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=hline_label)
        ax.legend(fontsize=8)
    if log_x:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=min(0.0, *(p["x"] for p in points)))  # no empty negative decade
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metric_panels(
    x: Sequence[float],
    panels: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    path: str | Path,
    *,
    xlabel: str,
    title: str = "",
) -> Path:
    """One panel per metric (``panels[metric][series] = {"y": [...], "se": [...] (optional)}``), each
    series a line against ``x`` with one-standard-error bars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.9), squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for name, s in series.items():
            ax.errorbar(x, s["y"], yerr=s.get("se"), marker="o", markersize=4, capsize=3, label=name)
        ax.set(xlabel=xlabel, ylabel=METRIC_LABELS.get(metric, metric), title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def kl_curves(
    kl: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    ylabel: str,
    title: str = "",
    labels: Sequence[str] = (),
    fits: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Two panels: every series against ``kl`` (nats) and against ``sqrt(kl)``; ``labels`` are written
    beside the first series' points; ``fits[name]`` (same length as ``kl``) is drawn dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, transform, xlabel in ((axes[0], lambda v: v, "KL, nats"), (axes[1], lambda v: v**0.5, "sqrt(KL)")):
        xs = [transform(v) for v in kl]
        for i, (name, ys) in enumerate(series.items()):
            line = ax.plot(xs, ys, marker="o", markersize=4, label=name)[0]
            if fits and name in fits:
                ax.plot(xs, fits[name], linestyle="--", linewidth=1, color=line.get_color(), label=f"{name}, fit")
            if i == 0:
                for xv, yv, text in zip(xs, ys, labels):
                    ax.annotate(str(text), (xv, yv), textcoords="offset points", xytext=(2, -10), fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
