"""Write an evaluation to a folder: results.json, scores.jsonl, PNG plots and a one-page report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefkit.eval import plots
from prefkit.eval.rm import Evaluation

__all__ = ["headline", "write_report"]

_STYLES = ["concise", "detailed plain", "detailed markdown"]  # RM-Bench's style order


def _get(d: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def headline(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The main numbers of ``results`` as ``(name, value)`` rows (absent ones left out)."""
    m = results["metrics"]
    rows = [
        ("pairwise accuracy (ties wrong)", _get(m, "accuracy")),
        ("tie rows", _get(m, "ties", "n")),
        ("tie policy", _get(m, "ties", "policy")),
        ("tie threshold |reward gap|", _get(m, "ties", "threshold")),
        ("accuracy on the decisive pairs", _get(m, "ties", "decisive_accuracy")),
        ("section score", _get(m, "sections", "score")),
        ("expected calibration error", _get(m, "calibration", "ece")),
        ("length: Pearson r(reward, tokens)", _get(m, "length_bias", "pearson")),
        ("length: Spearman rho(reward, tokens)", _get(m, "length_bias", "spearman")),
        ("accuracy when chosen is shorter", _get(m, "length_bias", "accuracy_chosen_shorter")),
        ("accuracy when chosen is longer", _get(m, "length_bias", "accuracy_chosen_longer")),
        ("baseline: longer response wins (lengths after truncation)", _get(m, "length_bias", "longer_wins_accuracy")),
        ("baseline: longer response wins (full texts)", _get(m, "length_bias", "longer_wins_accuracy_full_text")),
        ("ranking accuracy of the policy (log-likelihood)", _get(m, "ranking_accuracy", "policy")),
        ("ranking accuracy of the reference", _get(m, "ranking_accuracy", "reference")),
        ("idealized ranking accuracy", _get(m, "ranking_accuracy", "idealized")),
        ("alignment gap (idealized - policy)", _get(m, "ranking_accuracy", "alignment_gap")),
        ("best-of-N accuracy (tie credit 1/k)", _get(m, "best_of_n_accuracy")),
        ("best-of-N: mean over subsets (RewardBench 2's score with its six subsets)", _get(m, "subset_mean")),
        ("RewardBench 2 subsets missing", ", ".join(_get(m, "rewardbench2_missing") or []) or None),
        ("RM-Bench score (mean of its domains)", _get(m, "rmbench", "score")),
        ("RM-Bench: hard", _get(m, "rmbench", "hard")),
        ("RM-Bench: normal", _get(m, "rmbench", "normal")),
        ("RM-Bench: easy", _get(m, "rmbench", "easy")),
        ("RM-Bench domains missing", ", ".join(_get(m, "rmbench", "missing") or []) or None),
        ("style grid: hard", _get(m, "style_grid", "hard")),
        ("style grid: normal", _get(m, "style_grid", "normal")),
        ("style grid: easy", _get(m, "style_grid", "easy")),
        ("style grid: total (all records pooled)", _get(m, "style_grid", "total")),
        ("list pair accuracy", _get(m, "list_ranking", "pair_accuracy")),
        ("list top-1 accuracy", _get(m, "list_ranking", "top1_accuracy")),
    ]
    return [(name, value) for name, value in rows if value is not None]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plots(evaluation: Evaluation, out: Path) -> dict[str, str]:
    r = evaluation.results
    m = r["metrics"]
    made: dict[str, str] = {}
    if "calibration" in m:
        made["reliability diagram"] = plots.reliability_diagram(m["calibration"], out / "reliability.png").name
    if "length_bias" in m:
        made["reward vs length"] = plots.reward_length_scatter(evaluation.items, out / "reward_vs_length.png").name
    if "style_grid" in m:
        grid = m["style_grid"]["matrix"]
        styles = _STYLES if len(grid) == len(_STYLES) else None
        made["style grid"] = plots.style_grid_heatmap(grid, out / "style_grid.png", styles).name
    if m.get("subsets"):
        made["accuracy per subset"] = plots.subset_bars(m["subsets"], out / "subsets.png").name
    return made


def _markdown(results: dict[str, Any]) -> str:
    m = results["metrics"]
    lines = [
        "# Reward model evaluation",
        "",
        f"- model: `{results.get('model', '?')}` (scored as: {results['scorer']}"
        + (f", beta = {results['beta']}" if "beta" in results else "")
        + ")",
        f"- mode: {results['mode']}; records: {results['n_records']}; responses cut by max length: "
        f"{results['n_truncated']}",
        "",
        "| data | source | records |",
        "|---|---|---|",
    ]
    lines += [f"| {s['name'] or '-'} | `{s['source']}` | {s['n']} |" for s in results["sources"]]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in headline(results)]
    if m.get("subsets"):
        lines += ["", "## Per subset", "", "| subset | n | accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {s['n']} | {_fmt(s['accuracy'])} |" for name, s in m["subsets"].items()]
    if "rmbench" in m:
        lines += [
            "",
            "## RM-Bench domains",
            "",
            "| domain | n | hard | normal | easy | score |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {d['n']} | {_fmt(d['hard'])} | {_fmt(d['normal'])} | {_fmt(d['easy'])} | {_fmt(d['score'])} |"
            for name, d in m["rmbench"]["domains"].items()
        ]
    if "sections" in m:
        sec = m["sections"]
        lines += ["", "## Sections", "", "| section | accuracy | subsets weighted by |", "|---|---|---|"]
        weighting = sec.get("weighting", {})
        lines += [f"| {name} | {_fmt(value)} | {weighting.get(name, '')} |" for name, value in sec["sections"].items()]
        for name, absent in sec["missing"].items():
            lines.append(f"- {name}: subsets not in the data: {', '.join(absent)}")
    if results.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in results["plots"].items()]
    if results["skipped"]:
        lines += ["", "## Not computed", ""]
        lines += [f"- {name}: {reason}" for name, reason in results["skipped"].items()]
    lines += ["", "Definitions: docs/evaluation.md. Numbers: results.json; per-record scores: scores.jsonl.", ""]
    return "\n".join(lines)


def strict_json(value: Any, nulls: dict[str, str], path: str = "") -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN), each such place recorded in
    ``nulls`` (dotted path -> why), so results.json is strict JSON that any parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        nulls[path] = (
            "undefined (NaN): e.g. a correlation over constant values, or a mean over no items"
            if math.isnan(value)
            else f"infinite ({value})"
        )
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, nulls, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, nulls, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def write_report(evaluation: Evaluation, output_dir: str | Path, **extra: Any) -> Path:
    """Write ``results.json`` (``evaluation.results`` plus ``extra`` and the plot names),
    ``scores.jsonl``, the plots and ``report.md`` to ``output_dir``; returns the report's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**extra, **evaluation.results}
    results["plots"] = _plots(evaluation, out)
    nulls: dict[str, str] = {}
    results = strict_json(results, nulls)
    if nulls:
        results["null_reasons"] = nulls
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    with open(out / "scores.jsonl", "w") as handle:
        for i, item in enumerate(evaluation.items):
            handle.write(json.dumps(strict_json(item, {}, f"scores[{i}]"), allow_nan=False) + "\n")
    report = out / "report.md"
    report.write_text(_markdown(results))
    return report
