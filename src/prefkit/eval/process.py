"""Evaluate a process reward model: ``prefkit eval prm``.

    prefkit eval prm --model runs/prm_tiny --data examples/data/steps_prmbench.jsonl --layout prmbench \\
        --output runs/prm_tiny/eval_prmbench

Reads stepwise records (any stepwise file, or a public layout: ``prmbench``, ``processbench``,
``math_shepherd``, ``prm800k``, ``joined``; a folder stands for every ``*.jsonl`` file in it), scores every
step with the PRM (its own step separator), and reports, with the metric definitions of
`prefkit.eval.process_metrics`:

- ProcessBench: accuracy of the first rejected step on erroneous solutions, on correct ones, and their
  harmonic mean (F1), overall and per subset;
- PRMBench: PRMScore overall, per class and per group (the subsets are PRMBench's classes with
  ``--layout prmbench``);
- step AUROC, and the step counts.

A step is accepted when its probability (sigmoid of the PRM's logit) is at least ``--threshold`` (default
0.5). ``--threshold auto`` chooses it on a held-out part (``--threshold-fraction`` of the solutions, seeded)
by ProcessBench F1 and reports the metrics on the rest. ``--implicit --ref REF --beta B``: the model is a policy
scored as an implicit PRM (`prefkit.eval.implicit.ImplicitPRM`). Written to ``--output``: ``results.json``,
``scores.jsonl`` (every solution's labels and step probabilities), ``report.md`` and two plots.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefkit.data.loaders import parse_column_map
from prefkit.data.records import StepwiseRecord
from prefkit.eval.data import load_source
from prefkit.eval.process_metrics import (
    choose_threshold,
    first_error,
    first_rejected,
    per_class_table,
    prmbench_scores,
    processbench_scores,
    step_auroc,
)

__all__ = ["configure", "evaluate_steps", "load_step_records", "run", "write_prm_report"]


def load_step_records(
    sources: Sequence[tuple[str | None, str]],
    *,
    layout: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
) -> tuple[list[StepwiseRecord], list[str]]:
    """Stepwise records and their subsets from ``(name, path)`` sources (a folder: its ``*.jsonl`` files,
    sorted). A record's subset is its row's ``subset`` (``prmbench``: the error class), else the source's
    name, else ``"all"``. The first bad row is an error naming the file, row and field."""
    records: list[StepwiseRecord] = []
    subsets: list[str] = []
    options = {"kind": "stepwise", "column_map": column_map, "split": split, "layout": layout}
    for name, path in sources:
        folder = Path(path)
        files = sorted(str(p) for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        for file in files or [path]:
            _, _, recs, subs, _ = load_source(file, name, options)
            records.extend(recs)
            subsets.extend(subs)
    if not records:
        raise ValueError("no stepwise records in " + ", ".join(p for _, p in sources))
    return records, subsets


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def evaluate_steps(
    records: Sequence[StepwiseRecord],
    subsets: Sequence[str],
    logits: Sequence[Sequence[float]],
    *,
    threshold: float | str = 0.5,
    threshold_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics of per-step ``logits`` (one list per record; shorter than the record's steps where steps
    were cut) against the records' labels. ``threshold``: a probability, or ``"auto"`` (chosen by ProcessBench
    F1 on ``threshold_fraction`` of the records, seeded; the metrics are then over the other records)."""
    probs = [[_sigmoid(z) for z in row] for row in logits]
    index = [i for i, row in enumerate(probs) if row]  # records with at least one scored step
    cut = sum(1 for i in index if len(probs[i]) < len(records[i].labels))
    held: list[int] = []
    if threshold == "auto":
        shuffled = list(index)
        random.Random(seed).shuffle(shuffled)
        n_held = max(1, round(threshold_fraction * len(shuffled)))
        held, index = sorted(shuffled[:n_held]), sorted(shuffled[n_held:])
        if not index:
            raise ValueError("--threshold auto leaves no solution to evaluate on; give more solutions or a threshold")
        value = choose_threshold(
            [probs[i] for i in held], [first_error(records[i].labels[: len(probs[i])]) for i in held]
        )
        source = f"chosen by ProcessBench F1 on {len(held)} held-out solutions (seed {seed})"
    else:
        value, source = float(threshold), "given"
    labels = [list(records[i].labels[: len(probs[i])]) for i in index]
    scores = [probs[i] for i in index]
    names = [subsets[i] for i in index]
    truth = [first_error(y) for y in labels]
    predicted = [first_rejected(s, value) for s in scores]
    by_subset = {}
    for name in sorted(set(names)):
        rows = [k for k, n in enumerate(names) if n == name]
        by_subset[name] = processbench_scores([truth[k] for k in rows], [predicted[k] for k in rows])
    flat_scores = [p for row in scores for p in row]
    flat_labels = [y for row in labels for y in row]
    return {
        "threshold": value,
        "threshold_source": source,
        "n_solutions": len(index),
        "n_held_out": len(held),
        "n_unscored": len(records) - len(index) - len(held),
        "n_cut": cut,
        "n_steps": len(flat_scores),
        "n_wrong_steps": sum(1 for y in flat_labels if float(y) <= 0.5),
        "processbench": processbench_scores(truth, predicted) | {"subsets": by_subset},
        "prmbench": prmbench_scores(labels, [[p >= value for p in s] for s in scores], names),
        "step_auroc": step_auroc(flat_scores, flat_labels),
        "_items": [
            {
                "id": records[i].id,
                "subset": subsets[i],
                "labels": labels[k],
                "probabilities": scores[k],
                "first_error": truth[k],
                "first_rejected": predicted[k],
            }
            for k, i in enumerate(index)
        ],
    }


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def headline(results: dict[str, Any]) -> list[tuple[str, Any]]:
    pb = results["processbench"]
    return [
        ("ProcessBench F1", pb["f1"]),
        ("  accuracy on erroneous solutions", pb["error_accuracy"]),
        ("  accuracy on correct solutions", pb["correct_accuracy"]),
        ("PRMBench PRMScore", results["prmbench"]["prmscore"]),
        ("step AUROC", results["step_auroc"]),
        ("threshold", results["threshold"]),
    ]


def write_prm_report(results: dict[str, Any], output: str | Path, **extra: Any) -> Path:
    """Write ``results.json``, ``scores.jsonl``, ``report.md`` and the plots into ``output``; report.md's path."""
    from prefkit.eval.plots import step_score_histogram, subset_bars

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    items = results.pop("_items")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item) + "\n")
    results = {**extra, **results}
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    plots = {"step probabilities": step_score_histogram(items, results["threshold"], out / "step_scores.png").name}
    classes = results["prmbench"]["classes"]
    if len(classes) > 1:
        bars = {c: {"accuracy": v["prmscore"], "n": v["n"]} for c, v in classes.items()}
        plots["PRMScore per class"] = subset_bars(bars, out / "prmscore_per_class.png", label="PRMScore").name
    pb, prm = results["processbench"], results["prmbench"]
    lines = [f"# Process reward model evaluation: {extra.get('model', '')}", ""]
    lines += [
        f"- data: {', '.join(extra.get('data', []))}",
        f"- threshold: {_fmt(results['threshold'])} ({results['threshold_source']})",
    ]
    lines += [
        f"- solutions: {results['n_solutions']} evaluated ({results['n_held_out']} held out for the threshold, "
        f"{results['n_unscored']} with no step within max_length, {results['n_cut']} cut), steps: "
        f"{results['n_steps']} ({results['n_wrong_steps']} wrong)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name.strip()} | {_fmt(value)} |" for name, value in headline(results)]
    lines += [
        "",
        "## ProcessBench per subset",
        "",
        "| subset | F1 | erroneous acc. (n) | correct acc. (n) |",
        "|---|---|---|---|",
    ]
    for name, s in pb["subsets"].items():
        lines.append(
            f"| {name} | {_fmt(s['f1'])} | {_fmt(s['error_accuracy'])} ({s['n_error']}) | "
            f"{_fmt(s['correct_accuracy'])} ({s['n_correct']}) |"
        )
    lines += [
        "",
        "## PRMBench",
        "",
        f"PRMScore {_fmt(prm['prmscore'])} (F1 {_fmt(prm['f1'])}, negative F1 {_fmt(prm['negative_f1'])}).",
    ]
    if prm["groups"]:
        lines.append("Groups: " + ", ".join(f"{g} {_fmt(v)}" for g, v in prm["groups"].items()) + ".")
    lines += ["", "| class | PRMScore | F1 | negative F1 | n |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {_fmt(s)} | {_fmt(f)} | {_fmt(nf)} | {n} |" for c, s, f, nf, n in per_class_table(prm)]
    lines += ["", "## Plots", ""] + [f"- {name}: ![{name}]({file})" for name, file in plots.items()]
    lines += ["", "Definitions: docs/evaluation.md (process reward models).", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit eval prm``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--model", required=True, help="process reward model folder (trained with a process loss)")
    parser.add_argument(
        "--implicit",
        action="store_true",
        help="--model is a policy: score each step by beta * its log-ratio to --ref (an implicit PRM; Yuan et al.)",
    )
    parser.add_argument("--ref", default=None, help="the reference model of --implicit (folder, Hub id or 'tiny')")
    parser.add_argument("--beta", type=float, default=None, help="--implicit: the beta the policy was trained with")
    parser.add_argument(
        "--separator", default=None, help="--implicit: the text that ends every step (default: a newline)"
    )
    parser.add_argument(
        "--cumulative", action="store_true", help="--implicit: score a step by the sum up to it (a q-value)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model's)")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="stepwise file or folder of *.jsonl files; repeat for several. NAME: the subset of rows without one",
    )
    parser.add_argument("--layout", default=None, help="prmbench, processbench, math_shepherd, prm800k, joined[:SEP]")
    parser.add_argument("--map", nargs="+", default=None, metavar="TARGET=SOURCE", help="rename columns first")
    parser.add_argument("--split", default=None, help="split of a dataset folder or Hub dataset")
    parser.add_argument("--threshold", default="0.5", help="step acceptance probability, or 'auto' (default 0.5)")
    parser.add_argument("--threshold-fraction", type=float, default=0.2, help="with --threshold auto: held-out share")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="solutions per forward pass (default 16)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per solution; later steps are cut")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N solutions only")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, help="folder for results.json, scores.jsonl, report.md, plots")


def _threshold(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"--threshold: expected a probability in [0, 1] or 'auto', got {value!r}")
    return t


def _check_args(args: argparse.Namespace) -> float | str:
    threshold = _threshold(args.threshold)
    if args.implicit and (args.ref is None or args.beta is None):
        raise ValueError(
            "--implicit needs --ref (the reference model) and --beta (the beta the policy was trained with)"
        )
    if (
        not args.implicit
        and any(v is not None for v in (args.ref, args.beta, args.separator))
        or (not args.implicit and args.cumulative)
    ):
        raise ValueError("--ref, --beta, --separator and --cumulative go with --implicit (an implicit PRM)")
    if args.beta is not None and not args.beta > 0:
        raise ValueError(f"--beta: expected a number > 0, got {args.beta}")
    if not 0.0 < args.threshold_fraction < 1.0:
        raise ValueError(f"--threshold-fraction: expected a number in (0, 1), got {args.threshold_fraction}")
    for flag in ("batch_size", "max_length", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {value}")
    return threshold


def _scorer(args: argparse.Namespace, tokenizer, device: str):
    """The step scorer ``args`` name: a PRM, or with ``--implicit`` a policy against its reference."""
    if args.implicit:
        from prefkit.eval.implicit import ImplicitPRM
        from prefkit.models.loading import load_policy, load_reference

        policy = load_policy(args.model, dtype=args.dtype).to(device)
        reference = load_reference(args.ref, dtype=args.dtype).to(device)
        return ImplicitPRM(
            policy,
            reference,
            tokenizer,
            beta=args.beta,
            separator=args.separator if args.separator is not None else "\n",
            cumulative=args.cumulative,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    from prefkit.models.process import PRMScorer, load_process_reward_model

    model = load_process_reward_model(args.model, dtype=args.dtype, device=device)
    return PRMScorer(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the headline; 2 on bad input (one line on stderr)."""
    from prefkit.eval.commands import parse_data_argument, training_data_warnings
    from prefkit.train.settings import ConfigError, check_model_path

    try:
        threshold = _check_args(args)
        for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer), ("--ref", args.ref)):
            check_model_path(flag, value)
        sources = [parse_data_argument(v) for v in args.data]
        records, subsets = load_step_records(
            sources, layout=args.layout, column_map=parse_column_map(args.map) if args.map else None, split=args.split
        )
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        records, subsets = records[: args.limit], subsets[: args.limit]
    for warning in training_data_warnings(args.model, [path for _, path in sources]):
        print(f"warning: {warning}", file=sys.stderr)
    import torch

    from prefkit.models.loading import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        logits = _scorer(args, tokenizer, device).score(records, progress=not args.no_progress)
        results = evaluate_steps(
            records, subsets, logits, threshold=threshold, threshold_fraction=args.threshold_fraction, seed=args.seed
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    extra = {"model": args.model, "data": args.data, "layout": args.layout, "device": device}
    if args.implicit:
        extra.update(implicit=True, reference=args.ref, beta=args.beta, cumulative=args.cumulative)
    report = write_prm_report(results, args.output, **extra)
    for name, value in headline(results):
        print(f"{name}: {_fmt(value)}")
    print(f"wrote {report} (and results.json, scores.jsonl, plots) in {report.parent}")
    return 0
