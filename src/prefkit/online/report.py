"""``report.md`` and ``curves.png`` of an online run: the reward (and each reward), the KL to the
reference and the completion length against the step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_online_report"]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def write_online_report(out: str | Path, history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> Path:
    """Write ``out/curves.png`` and ``out/report.md`` from a Trainer ``log_history``; returns the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = [r for r in history if "reward" in r and "step" in r]
    reward_keys = sorted({k for r in rows for k in r if k.startswith("rewards/")})
    panels = [("reward", ["reward", *reward_keys], "mean reward")]
    if any("kl" in r for r in rows):
        panels.append(("KL to the reference", ["kl"], "KL per token (nats)"))
    if any("entropy" in r for r in rows):
        panels.append(("policy entropy", ["entropy"], "nats per completion token"))
    panels.append(("completion length", ["completion_length"], "tokens"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys, ylabel) in zip(axes[0], panels):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker=".", label=key)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    first, last = (rows[0], rows[-1]) if rows else ({}, {})

    def fmt(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    lines = [
        "# Online run",
        "",
        f"Loss `{settings.get('loss')}`, {_how(settings)}, "
        f"{settings.get('num_generations')} completions per prompt, {len(rows)} steps.",
        "",
        "| | first step | last step |",
        "|---|---|---|",
        *(
            f"| {k} | {fmt(first, k)} | {fmt(last, k)} |"
            for k in ["reward", *reward_keys, "kl", "kl_penalty", "entropy", "completion_length"]
        ),
        "",
        "![reward, KL, entropy and completion length against the step](curves.png)",
        "",
        "Every logged value is in `metrics.jsonl`; the configuration as run in `config.yaml`.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _how(settings: Mapping[str, Any]) -> str:
    """How the samples are learned from: the advantage (policy losses) or the pairs (pairwise losses)."""
    from prefkit.losses import get_loss

    try:
        pairwise = get_loss(str(settings.get("loss"))).kind == "pairwise"
    except KeyError:
        pairwise = False
    if settings.get("critic") is not None:
        return "PPO with a critic (GAE advantages)"
    if pairwise:
        return f"pairs `{settings.get('pairs', 'best_worst')}` from the rewards' scores"
    return f"advantage `{settings.get('advantage')}`"
