"""Process-reward metrics as pure functions of step scores (docs/evaluation.md, "Process reward models").

- ProcessBench (Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical
  Reasoning"): a solution's predicted label is the index of the first step the PRM rejects (score below
  the threshold), -1 when it accepts every step; it is right when it equals the labelled index of the first
  wrong step (-1 for a correct solution). Reported: accuracy on the erroneous solutions, accuracy on the
  correct ones, and their harmonic mean ("F1").
- PRMBench (Song et al. 2025, "PRMBench: A Fine-grained and Challenging Benchmark for Process-Level Reward
  Models"), as its scorer computes it: every step is a positive (correct) or a negative (an error step);
  a step predicted correct (score above the threshold) is TP or FP, predicted wrong TN or FN; per error
  class, F1 of the positives and F1 of the negatives; PRMScore = (F1 + negative F1) / 2, except for the
  ``multi_solutions`` class (no error steps), whose score is its F1; a score below 0 (an undefined F1,
  which PRMBench writes as -1) counts as 0. The overall PRMScore is computed from the confusion counts
  summed over every class; the three groups (simplicity, soundness, sensitivity) average their classes.
- Step AUROC: the probability that a correct step scores above a wrong one (ties count half).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PRMBENCH_GROUPS",
    "choose_threshold",
    "first_error",
    "first_rejected",
    "prmbench_scores",
    "processbench_scores",
    "step_auroc",
]

# PRMBench's classes by group, as its result tables group them.
PRMBENCH_GROUPS = {
    "simplicity": ("redundency", "circular"),
    "soundness": ("counterfactual", "step_contradiction", "domain_inconsistency", "confidence"),
    "sensitivity": ("missing_condition", "deception", "multi_solutions"),
}
_POSITIVE_ONLY = ("multi_solutions",)


def first_error(labels: Sequence[Any]) -> int:
    """Index of the first wrong step of a labelled solution (a label <= 0.5 is wrong), -1 when none is."""
    for k, label in enumerate(labels):
        if float(label) <= 0.5:
            return k
    return -1


def first_rejected(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step whose score is below ``threshold``, -1 when every step passes."""
    for k, score in enumerate(scores):
        if score < threshold:
            return k
    return -1


def processbench_scores(truth: Sequence[int], predicted: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's accuracies of predicted first-error indices (-1: no error) against the labelled ones.

    Returns ``{"error_accuracy", "correct_accuracy", "f1", "n_error", "n_correct"}``; an accuracy over no
    solutions is None, and so is F1 then (F1 is 0 when both accuracies are 0)."""
    if len(truth) != len(predicted):
        raise ValueError(f"truth has {len(truth)} solutions, predicted {len(predicted)}")
    err = [p == t for t, p in zip(truth, predicted) if t != -1]
    ok = [p == -1 for t, p in zip(truth, predicted) if t == -1]
    error_acc = sum(err) / len(err) if err else None
    correct_acc = sum(ok) / len(ok) if ok else None
    f1 = None
    if error_acc is not None and correct_acc is not None:
        f1 = 0.0 if error_acc + correct_acc == 0 else 2 * error_acc * correct_acc / (error_acc + correct_acc)
    return {
        "error_accuracy": error_acc,
        "correct_accuracy": correct_acc,
        "f1": f1,
        "n_error": len(err),
        "n_correct": len(ok),
    }


def _f1s(tp: int, fp: int, tn: int, fn: int) -> tuple[float, float]:
    """PRMBench's positive and negative F1, with its scorer's conventions: a precision or recall over an
    empty set is -1, and an F1 whose precision + recall is 0 is -1 (so an empty set of predictions gives
    F1 0 when the class has members, -1 when the class and the predictions are both empty)."""

    def f1(hit: int, false_alarm: int, miss: int) -> float:
        precision = hit / (hit + false_alarm) if hit + false_alarm else -1.0
        recall = hit / (hit + miss) if hit + miss else -1.0
        return 2 * precision * recall / (precision + recall) if precision + recall != 0 else -1.0

    return f1(tp, fp, fn), f1(tn, fn, fp)


def prmbench_scores(
    labels: Sequence[Sequence[Any]], predicted: Sequence[Sequence[bool]], classes: Sequence[str]
) -> dict[str, Any]:
    """PRMBench's scores of predicted step labels (True: the step is judged correct) per solution.

    ``labels`` are the true step labels (True / 1: correct, False / 0: an error step), ``classes`` each
    solution's error class. A solution may have fewer predictions than labels (steps cut by a length
    limit): only the predicted steps count, as PRMBench counts only the steps a model labelled.
    Returns ``{"prmscore", "f1", "negative_f1", "confusion", "classes": {class: {prmscore, f1,
    negative_f1, confusion, n}}, "groups": {group: mean PRMScore of its classes present}}``."""
    if not len(labels) == len(predicted) == len(classes):
        raise ValueError(f"got {len(labels)} label lists, {len(predicted)} predictions and {len(classes)} classes")
    counts: dict[str, list[int]] = {}
    n: dict[str, int] = {}
    for truth, guess, cls in zip(labels, predicted, classes):
        c = counts.setdefault(cls, [0, 0, 0, 0])  # TP, FP, TN, FN
        n[cls] = n.get(cls, 0) + 1
        for y, p in zip(truth, guess):
            correct = float(y) > 0.5
            c[(0 if correct else 1) if p else (3 if correct else 2)] += 1
    per_class = {}
    for cls, (tp, fp, tn, fn) in sorted(counts.items()):
        f1, neg = _f1s(tp, fp, tn, fn)
        score = f1 if cls in _POSITIVE_ONLY else 0.5 * f1 + 0.5 * neg
        per_class[cls] = {
            "prmscore": max(score, 0.0),
            "f1": f1,
            "negative_f1": neg,
            "confusion": {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
            "n": n[cls],
        }
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    f1, neg = _f1s(*total)
    groups = {}
    for group, members in PRMBENCH_GROUPS.items():
        present = [per_class[m]["prmscore"] for m in members if m in per_class]
        if present:
            groups[group] = sum(present) / len(present)
    return {
        "prmscore": max(0.5 * f1 + 0.5 * neg, 0.0),
        "f1": f1,
        "negative_f1": neg,
        "confusion": dict(zip(("TP", "FP", "TN", "FN"), total)),
        "classes": per_class,
        "groups": groups,
    }


def step_auroc(scores: Sequence[float], labels: Sequence[Any]) -> float | None:
    """AUROC of step scores for telling correct steps (label > 0.5) from wrong ones: the chance that a
    random correct step scores above a random wrong one, ties counting half. None without both kinds."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray([float(v) > 0.5 for v in labels])
    if s.shape != y.shape:
        raise ValueError(f"got {s.size} scores and {y.size} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def choose_threshold(
    scores: Sequence[Sequence[float]], truth: Sequence[int], candidates: Sequence[float] | None = None
) -> float:
    """The threshold that maximises ProcessBench's F1 on ``scores`` (per-solution step probabilities) with
    first-error labels ``truth``; ``candidates`` default to 0.01, 0.02, ..., 0.99. Ties go to the threshold
    closest to 0.5."""
    grid = list(candidates) if candidates is not None else [k / 100 for k in range(1, 100)]
    if not grid:
        raise ValueError("no candidate thresholds")

    def key(t: float) -> tuple[float, float]:
        f1 = processbench_scores(truth, [first_rejected(s, t) for s in scores])["f1"]
        return (f1 if f1 is not None else -1.0, -abs(t - 0.5))

    return max(grid, key=key)


def per_class_table(results: Mapping[str, Any]) -> list[tuple[str, float, float, float, int]]:
    """``(class, prmscore, f1, negative_f1, n)`` rows of `prmbench_scores` output, in PRMBench's group order."""
    order = [c for members in PRMBENCH_GROUPS.values() for c in members]
    classes = results["classes"]
    names = [c for c in order if c in classes] + sorted(c for c in classes if c not in order)
    return [(c, classes[c]["prmscore"], classes[c]["f1"], classes[c]["negative_f1"], classes[c]["n"]) for c in names]
