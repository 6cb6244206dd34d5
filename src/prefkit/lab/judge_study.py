"""A generative judge against a reward model trained on the same lab pairs (`prefkit lab study judge`).

Reward benchmarks now rank generative judges beside scalar reward models; the lab can ask which learns the
preferences better from the same data, because it knows them. Per seed, the world's default annotator labels
``max(sizes)`` pairs; for each size ``n`` the first ``n`` of them train

- a **reward model**: the reference policy's backbone with a new scalar head, Bradley-Terry loss (`train_reward_model`);
- a **generative judge**: the reference policy itself, supervised on verdicts (`loss: sft`) over the same pairs made
  into judge prompts in both orders (`prefkit.data.convert.judge_training_pairs`, template `LAB_TEMPLATE`);

with the same number of passes over the data, batch size and learning rate. Both are measured on fresh pairs against
the world's true preferences: the reward model by ``r(a) > r(b)``; the judge by its log-probability verdict in both
orders (``v_1`` with ``a`` shown first, ``v_2`` with ``b`` first): *order-averaged* (``v_1 - v_2 > 0``), *one order*
(the share of the 2N single verdicts that are right) and its position bias. The annotator's own agreement with the
truth on the training labels is the ceiling any learner of those labels faces. Mean ± standard error over seeds.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.data.judge_prompts import JudgeTemplate
from prefkit.lab.studies import _check_positive, _check_seeds, _ending, _mean_se, _pm, _setup, _trainable, _write

__all__ = ["LAB_TEMPLATE", "judge_study"]

# The lab's tokenizer is word-level over the world's words: '|' is its unknown token (a separator here), and the
# two verdict labels must be world words; 'a' names the first response, 'the' the second.
LAB_TEMPLATE = JudgeTemplate(text="{prompt} | {a} | {b} |", labels=(" a", " the"))


def _judge_scores(world, model, tokenizer, pairs) -> dict[str, float]:
    """The judge's agreement with the true preferences on ``pairs`` (order-averaged and per single verdict)."""
    from prefkit.data.records import PairwiseRecord
    from prefkit.eval.judge import judge_pairs

    records = [PairwiseRecord(p, a, b) for p, a, b in pairs]
    v = judge_pairs(model, tokenizer, records, LAB_TEMPLATE, batch_size=128, progress=False)
    truth = np.array([world.preference_logit(p, a, b) for p, a, b in pairs])
    keep = truth != 0
    first_better, v = truth[keep] > 0, v[keep]
    averaged = v[:, 0] - v[:, 1]
    averaged_credit = np.where(averaged == 0, 0.5, (averaged > 0) == first_better)
    single = np.concatenate([(v[:, 0] > 0) == first_better, (v[:, 1] < 0) == first_better])
    return {
        "order_averaged": float(averaged_credit.mean()),
        "one_order": float(single.mean()),
        "position_bias": float(np.concatenate([v[:, 0] > 0, v[:, 1] > 0]).mean()),
    }


def judge_study(
    world: str = "default",
    sizes: Sequence[int] = (250, 1000, 4000),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    epochs: int = 4,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    heldout_pairs: int = 500,
    output_dir: str | Path = "runs/lab/judge",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a reward model and a generative judge on the first ``n`` annotated pairs for every ``n`` in ``sizes``
    and seed in ``seeds`` (data seed ``seed + 1 + 100 s``), ``epochs`` passes each, and compare their agreement with
    the true preferences on ``heldout_pairs`` fresh pairs (module docstring). Writes results.md, results.json and
    agreement.png to ``output_dir``."""
    from prefkit.data.convert import judge_training_pairs
    from prefkit.lab import draw_dataset
    from prefkit.lab.evaluate import reward_model_agreement, score_responses, truth_pairs
    from prefkit.lab.plots import metric_panels
    from prefkit.lab.runs import train_policy, train_reward_model

    _check_positive(epochs=epochs, batch_size=batch_size, heldout_pairs=heldout_pairs)
    if not sizes:
        raise ValueError("no sizes given")
    _check_positive(**{f"size {n}": n for n in sizes})
    sizes = sorted(set(sizes))
    seeds = _check_seeds(seeds)
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "a generative judge against a reward model")
    say, ref = setup.say, setup.reference
    heldout = truth_pairs(setup.world, heldout_pairs, seed=seed + 2)
    runs: list[dict[str, Any]] = []
    for s in seeds:
        data = draw_dataset(setup.world, "pairwise", sizes[-1], seed=seed + 1 + 100 * s)
        for n in sizes:
            records = data[:n]
            label_truth = [setup.world.preference_logit(r.prompt, r.chosen, r.rejected) for r in records]
            labels_right = float(np.mean([t > 0 for t in label_truth if t != 0]))
            rm_steps = max(1, math.ceil(epochs * n / batch_size))
            common = {"batch_size": batch_size, "learning_rate": learning_rate, "seed": s, "progress": False}
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                rm = train_reward_model(ref, records, output_dir=tmp, steps=rm_steps, **common).model
            rm_seconds = time.perf_counter() - t0
            rm_agreement = reward_model_agreement(
                setup.world, lambda items: score_responses(rm, ref.tokenizer, items, progress=False), heldout
            )["agreement"]
            judge_records, _ = judge_training_pairs(records, LAB_TEMPLATE)
            judge_steps = max(1, math.ceil(epochs * len(judge_records) / batch_size))
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                judge = train_policy(
                    _trainable(ref), judge_records, output_dir=tmp, loss="sft", steps=judge_steps, **common
                ).model
            judge_seconds = time.perf_counter() - t0
            scores = _judge_scores(setup.world, judge, ref.tokenizer, heldout)
            runs.append(
                {
                    "seed": s,
                    "pairs": n,
                    "labels_right": labels_right,
                    "rm_agreement": rm_agreement,
                    "rm_steps": rm_steps,
                    "rm_seconds": rm_seconds,
                    "judge_steps": judge_steps,
                    "judge_seconds": judge_seconds,
                    **{f"judge_{k}": v for k, v in scores.items()},
                }
            )
            say(
                f"  seed {s}, {n} pairs: reward model {rm_agreement:.3f}, judge {scores['order_averaged']:.3f} "
                f"(one order {scores['one_order']:.3f}, position bias {scores['position_bias']:.2f})"
            )
    untrained = _judge_scores(setup.world, ref.model, ref.tokenizer, heldout)
    rows = []
    keys = ("labels_right", "rm_agreement", "judge_order_averaged", "judge_one_order", "judge_position_bias")
    for n in sizes:
        at = [r for r in runs if r["pairs"] == n]
        row: dict[str, Any] = {"pairs": n}
        for key in keys:
            row[key], row[f"{key}_se"], _ = _mean_se([r[key] for r in at])
        row["rm_seconds"] = float(np.mean([r["rm_seconds"] for r in at]))
        row["judge_seconds"] = float(np.mean([r["judge_seconds"] for r in at]))
        rows.append(row)
    results = {
        "study": "judge",
        "world": world,
        "seed": seed,
        "seeds": seeds,
        "sizes": sizes,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "heldout_pairs": heldout_pairs,
        "template": {"text": LAB_TEMPLATE.text, "labels": list(LAB_TEMPLATE.labels)},
        "untrained_judge": untrained,
        "rows": rows,
        "runs": runs,
    }

    def series(key: str) -> dict[str, list[float]]:
        return {"y": [r[key] for r in rows], "se": [r[f"{key}_se"] for r in rows]}

    metric_panels(
        sizes,
        {
            "agreement with the true preferences": {
                "reward model": series("rm_agreement"),
                "judge, order-averaged": series("judge_order_averaged"),
                "judge, one order": series("judge_one_order"),
                "annotator labels": series("labels_right"),
            },
            "judge position bias": {"judge": series("judge_position_bias")},
        },
        setup.out / "agreement.png",
        xlabel="training pairs",
        title=f"Generative judge and reward model on the same pairs, world '{world}'",
    )
    results["seconds"] = time.perf_counter() - start
    _write(setup.out, results, _markdown(results))
    say(f"  wrote {setup.out}/results.md, results.json, agreement.png ({results['seconds']:.0f} s)")
    return results


def _markdown(r: dict[str, Any]) -> list[str]:
    u = r["untrained_judge"]
    lines = [
        f"# A generative judge against a reward model on the same pairs, lab world `{r['world']}` "
        f"(world seed {r['seed']})",
        "",
        f"Per seed the world's annotator labels {max(r['sizes'])} pairs; the first n train a reward model (the "
        "reference backbone with a scalar head, Bradley-Terry) and a generative judge (the reference policy, "
        f"supervised on verdicts over the same pairs in both orders, template `{r['template']['text']}` with labels "
        f"{r['template']['labels']}), each {r['epochs']} passes over its data, batch {r['batch_size']}, learning rate "
        f"{r['learning_rate']}. Agreement with the true preferences on {r['heldout_pairs']} fresh pairs; mean ± "
        f"standard error over the seeds {', '.join(map(str, r['seeds']))}. The untrained reference as a judge: "
        f"order-averaged {u['order_averaged']:.3f}, one order {u['one_order']:.3f}, position bias "
        f"{u['position_bias']:.2f}.",
        "",
        "| pairs | annotator labels right | reward model | judge, order-averaged | judge, one order | "
        "judge position bias | train s (RM / judge) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['pairs']} | {_pm(row['labels_right'], row['labels_right_se'])} | "
            f"{_pm(row['rm_agreement'], row['rm_agreement_se'])} | "
            f"{_pm(row['judge_order_averaged'], row['judge_order_averaged_se'])} | "
            f"{_pm(row['judge_one_order'], row['judge_one_order_se'])} | "
            f"{_pm(row['judge_position_bias'], row['judge_position_bias_se'], 2)} | "
            f"{row['rm_seconds']:.1f} / {row['judge_seconds']:.1f} |"
        )
    lines += [
        "",
        "Annotator labels right: the share of the training labels that agree with the true preference (the "
        "annotator is Bradley-Terry, so some are flipped); a learner of these labels can beat it only by averaging "
        "the noise out. The judge sees each pair twice (both orders), so it takes twice the steps of the reward "
        "model for the same passes over the data.",
    ]
    return lines + _ending("agreement.png", "agreement with the true preferences", _summary(r), r["seconds"])


def _summary(r: dict[str, Any]) -> list[str]:
    text = []
    for row in r["rows"]:
        diff = row["judge_order_averaged"] - row["rm_agreement"]
        se = (row["judge_order_averaged_se"] ** 2 + row["rm_agreement_se"] ** 2) ** 0.5
        verdict = "above" if diff > 2 * se else "below" if diff < -2 * se else "within two standard errors of"
        text.append(
            f"With {row['pairs']} pairs the judge (order-averaged) is {verdict} the reward model ({diff:+.3f} ± "
            f"{se:.3f})."
        )
    last = r["rows"][-1]
    gap = last["judge_order_averaged"] - last["judge_one_order"]
    text.append(
        f"Judging both orders is worth {gap:+.3f} agreement at {last['pairs']} pairs over a single verdict; the "
        f"position bias is {last['judge_position_bias']:.2f} (0.5: none)."
    )
    return text
